/*
 * The budgeted calls of the tick path in C: `call`, `call_each` and `tick`, the same calls as
 * calls.lua's Lua functions of those names, which they replace in a Lua state when this library
 * is there (`asobi.lua.native`); `game.players()` and clib.lua's wrapper of `math.*` too, for
 * the same reason.
 *
 * Why C: each Lua state has its own copy of the host chunks' code (a prototype belongs to one
 * state).  Across hundreds of matches that code, its closures and upvalues are cold at every
 * match-tick, and arming a deadline, calling through `xpcall` and reading the outcome cost a
 * third of the crossing into Lua (docs/performance.md, "The budget machinery in C").  This code
 * is one copy for every state, and its count hook reads the clock without running a Lua
 * function.
 *
 * What it shares with calls.lua is one table per state, `S` (the indices below): the deadline,
 * the budget error once raised, the budget message's two halves, the count of host calls and
 * calls.lua's `cut`.  The Lua side raises the budget error (`cut`), checks the clock in host
 * functions and library wrappers, and wraps pcall, xpcall and coroutines; this side arms and
 * lifts the deadline around each call and reads the outcome, exactly as calls.lua's `B.call` and
 * `finish` do.  The calls raise nothing outside a protected call but an allocation failure,
 * which the host reports as the call running out of memory, as it would from the Lua functions.
 */
#include <math.h>

#include "_luaapi.h"

int asobi_tojson(lua_State *L);

/* calls.lua's S. */
enum { DEADLINE = 1, EXCEEDED, PREFIX, SUFFIX, HOST_CALLS, CUT };

/* The closures' upvalues. */
#define STATE lua_upvalueindex(1)
#define MESSAGE_HANDLER lua_upvalueindex(2)
#define HOOK_COUNT lua_upvalueindex(3)
#define MAX_NODES lua_upvalueindex(4)
#define CTX lua_upvalueindex(5)
#define FINISHED_KEY lua_upvalueindex(6)
#define TICK_KEY lua_upvalueindex(7)
#define PLAYERS_KEY lua_upvalueindex(8)

/* More ids than this in one batch and it ends early (calls.lua's MAX_IDS). */
#define MAX_IDS 1000
/* call_each's mark of a result written as JSON text (calls.lua's ENCODED). */
#define ENCODED 1

/* S in the registry, for the count hook (a hook has no upvalues). */
static const char state_key = 0;

/* Every HOOK_COUNT instructions of a budgeted call: past the deadline, calls.lua's `cut` raises
 * the budget error (and names the script line).  Lua leaves a hook room for a few values. */
static void budget_hook(lua_State *L, lua_Debug *ar) {
    (void)ar;
    lua_rawgetp(L, LUA_REGISTRYINDEX, &state_key);
    lua_rawgeti(L, -1, DEADLINE);
    int past = asobi_clock_now() > lua_tonumberx(L, -1, NULL);
    lua_pop(L, 1);
    if (!past) {
        lua_pop(L, 1);
        return;
    }
    lua_rawgeti(L, -1, CUT);
    lua_call(L, 0, 0);
}

static lua_Integer host_calls(lua_State *L) {
    lua_rawgeti(L, STATE, HOST_CALLS);
    lua_Integer n = lua_tointegerx(L, -1, NULL);
    lua_pop(L, 1);
    return n;
}

/* calls.lua's B.call up to the xpcall: a fresh budget error, the message's halves (stack
 * indices), the deadline, the hook. */
static void arm(lua_State *L, double deadline, int prefix, int suffix) {
    lua_pushnil(L);
    lua_rawseti(L, STATE, EXCEEDED);
    lua_pushvalue(L, prefix);
    lua_rawseti(L, STATE, PREFIX);
    lua_pushvalue(L, suffix);
    lua_rawseti(L, STATE, SUFFIX);
    lua_pushnumber(L, deadline);
    lua_rawseti(L, STATE, DEADLINE);
    lua_sethook(L, budget_hook, LUA_MASKCOUNT, (int)lua_tointegerx(L, HOOK_COUNT, NULL));
}

/* Leaves only `ok` and the value on top of the stack in place of everything from `base` up. */
static int outcome(lua_State *L, int base, int ok) {
    lua_insert(L, base);
    lua_settop(L, base);
    lua_pushboolean(L, ok);
    lua_insert(L, base);
    return 2;
}

/* The armed call of the function under the top `nargs` values, with calls.lua's message handler,
 * then calls.lua's `finish`: the deadline lifted and the hook removed at once (no instruction
 * runs in between, so nothing can be cut outside the call), then `true, results...` (`nresults`
 * of them, or all) or `false, message` in place of the function and its arguments.  Returns how
 * many values that is. */
static int call_armed(lua_State *L, int nargs, int nresults) {
    int base = lua_gettop(L) - nargs;
    lua_pushvalue(L, MESSAGE_HANDLER);
    lua_insert(L, base);
    int status = lua_pcall(L, nargs, nresults, base);
    lua_sethook(L, NULL, 0, 0);
    lua_checkstack(L, 3); /* after LUA_MULTRET the stack has no room to spare */
    lua_pushnumber(L, HUGE_VAL);
    lua_rawseti(L, STATE, DEADLINE);
    lua_rawgeti(L, STATE, EXCEEDED);
    if (lua_type(L, -1) != LUA_TNIL) {
        lua_pushnil(L);
        lua_rawseti(L, STATE, EXCEEDED);
        return outcome(L, base, 0);
    }
    lua_pop(L, 1);
    if (status != LUA_OK) return outcome(L, base, 0); /* the message: always a string */
    lua_pushboolean(L, 1);
    lua_rotate(L, base, 1); /* true, handler, results... */
    lua_rotate(L, base + 1, -1);
    lua_pop(L, 1);
    return lua_gettop(L) - base + 1;
}

/* call(prefix, suffix, until_time, fn, ...): calls.lua's B.call. */
static int budget_call(lua_State *L) {
    int top = lua_gettop(L);
    arm(L, lua_tonumberx(L, 3, NULL), 1, 2);
    return call_armed(L, top - 4, LUA_MULTRET);
}

/* calls.lua's B.call_each with its arguments at stack indices: the message's halves, the budget
 * and get_state at p..p+3, the state at `state`, `ids` ids from `first_id`.  Pushes the results
 * (per id: true, value; ENCODED, JSON text; or false, message) and returns how many. */
static int each_at(lua_State *L, int p, int state, int first_id, int ids) {
    if (ids > MAX_IDS) ids = MAX_IDS;
    if (!lua_checkstack(L, 2 * ids + 8)) {
        lua_pushfstring(L, "stack overflow (%d ids)", ids);
        lua_error(L);
    }
    double budget = lua_tonumberx(L, p + 2, NULL);
    lua_Integer max_nodes = lua_tointegerx(L, MAX_NODES, NULL);
    int pushed = 0;
    for (int i = 0; i < ids; i++) {
        lua_Integer before = host_calls(L);
        arm(L, asobi_clock_now() + budget, p, p + 1);
        lua_pushvalue(L, p + 3);
        lua_pushvalue(L, state);
        lua_pushvalue(L, first_id + i);
        call_armed(L, 2, 1);
        if (lua_toboolean(L, -2)) {
            /* The result as JSON text when the encoder writes it; it runs outside the deadline
             * (host code, bounded by max_nodes), protected: a heap at its cap refuses the text,
             * and the host's walk then does the work. */
            lua_pushcclosure(L, asobi_tojson, 0);
            lua_pushvalue(L, -2);
            lua_pushinteger(L, max_nodes);
            if (lua_pcall(L, 2, 1, 0) == LUA_OK && lua_type(L, -1) == LUA_TSTRING) {
                lua_insert(L, -3);
                lua_pop(L, 2);
                lua_pushinteger(L, ENCODED);
                lua_insert(L, -2);
            } else {
                lua_pop(L, 1);
            }
        }
        pushed += 2;
        if (host_calls(L) != before) break;
    }
    return pushed;
}

/* call_each(prefix, suffix, budget, fn, state, ids...) */
static int budget_call_each(lua_State *L) {
    return each_at(L, 1, 5, 6, lua_gettop(L) - 5);
}

/* (prefix, suffix, until_time, fn, state, state_prefix, state_suffix, state_budget, state_fn,
 * ids...): calls.lua's B.tick_then_each, the body of `tick`.  Returns finished, ok, the
 * tick's first result, then call_each's results when get_state is given and the tick succeeded
 * with a table (or nothing) and made no host calls. */
static int budget_tick_then_each(lua_State *L) {
    int top = lua_gettop(L);
    lua_Integer before = host_calls(L);
    arm(L, lua_tonumberx(L, 3, NULL), 1, 2);
    lua_pushvalue(L, 4);
    lua_pushvalue(L, 5);
    call_armed(L, 1, 1);
    /* ok at top + 1, the value at top + 2; the state the host adopts is the value when the
     * tick returned a table, else the one it was given.  `_finished` is read without
     * metamethods (no script code runs outside a budget). */
    int ok = lua_toboolean(L, top + 1);
    int value_type = lua_type(L, top + 2);
    int adopted = ok && value_type == LUA_TTABLE ? top + 2 : 5;
    int finished = 0;
    if (lua_type(L, adopted) == LUA_TTABLE) {
        lua_pushvalue(L, FINISHED_KEY);
        lua_rawget(L, adopted);
        finished = lua_toboolean(L, -1);
        lua_pop(L, 1);
    }
    lua_pushboolean(L, finished);
    lua_insert(L, top + 1); /* finished, ok, value */
    if (adopted != 5) adopted = top + 3;
    if (lua_type(L, 9) <= LUA_TNIL || !ok || host_calls(L) != before ||
        (value_type != LUA_TNIL && value_type != LUA_TTABLE)) {
        return 3;
    }
    return 3 + each_at(L, 6, adopted, 10, top - 9);
}

/* A math function as scripts call it (clib.lua's `numeric`): upvalues the function, its name
 * and the longest string accepted as a numeral.  A longer string in any argument is refused (C
 * converts it uninterruptibly), and an error of the function is raised again at the script's
 * line, or as the budget error when the budget ran out meanwhile: clib.lua's Lua closure does the
 * same, at several times the cost per call (a closure per function and per state). */
static int numeric_call(lua_State *L) {
    int n = lua_gettop(L);
    lua_Integer max_numeral = lua_tointegerx(L, lua_upvalueindex(3), NULL);
    for (int i = 1; i <= n; i++) {
        size_t len;
        if (lua_type(L, i) == LUA_TSTRING && (lua_tolstring(L, i, &len), len > (size_t)max_numeral)) {
            luaL_where(L, 1);
            lua_pushfstring(L, "%s: a string longer than %d bytes is not a number",
                            lua_tolstring(L, lua_upvalueindex(2), NULL), (int)max_numeral);
            lua_concat(L, 2);
            return lua_error(L);
        }
    }
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    if (lua_pcall(L, n, LUA_MULTRET, 0) == LUA_OK) return lua_gettop(L);
    lua_rawgetp(L, LUA_REGISTRYINDEX, &state_key);
    if (lua_rawgeti(L, -1, EXCEEDED) != LUA_TNIL) return lua_error(L);
    lua_pop(L, 2);
    if (lua_type(L, -1) == LUA_TSTRING) {
        luaL_where(L, 1);
        lua_insert(L, -2);
        lua_concat(L, 2);
    }
    return lua_error(L);
}

/* numeric(fn, name, max_numeral): `fn` as scripts call it (numeric_call). */
static int numeric_wrap(lua_State *L) {
    lua_settop(L, 3);
    lua_pushcclosure(L, numeric_call, 3);
    return 1;
}

/* tick(prefix, suffix, until_time, tick_no, fn, state, ...): calls.lua's B.tick (sandbox.lua's
 * `api.tick`): the tick number game.tick() reads (`ctx.tick`, a plain table) set, then
 * `tick_then_each`. */
static int budget_tick(lua_State *L) {
    lua_pushvalue(L, TICK_KEY);
    lua_pushvalue(L, 4);
    lua_rawset(L, CTX);
    lua_rotate(L, 4, -1);
    lua_pop(L, 1);
    return budget_tick_then_each(L);
}

/* game.players() (sandbox.lua's `lib_game.players`): a new table with every key and value of
 * `ctx.players`, which the host sets, so a script can change its copy freely. */
static int players_copy(lua_State *L) {
    lua_pushvalue(L, PLAYERS_KEY);
    lua_rawget(L, CTX);
    if (lua_type(L, -1) != LUA_TTABLE) {
        lua_createtable(L, 0, 0);
        return 1;
    }
    int players = lua_gettop(L);
    lua_createtable(L, 4, 0);
    lua_pushnil(L);
    while (lua_next(L, players)) {
        lua_pushvalue(L, -2);
        lua_insert(L, -2);
        lua_rawset(L, players + 1);
    }
    return 1;
}

/* budget(S, message_handler, hook_count, max_nodes, ctx): `call`, `call_each`, `tick` and
 * `players` bound to S and to sandbox.lua's ctx, and the maker of math wrappers (`numeric`); or
 * nothing when this Lua's registry is not where this file expects it (calls.lua's own functions
 * then stay). */
int asobi_budget(lua_State *L) {
    if (lua_type(L, LUA_REGISTRYINDEX) != LUA_TTABLE || lua_type(L, 1) != LUA_TTABLE ||
        lua_type(L, 5) != LUA_TTABLE) {
        return 0;
    }
    lua_settop(L, 5);
    lua_pushvalue(L, 1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &state_key);
    static const lua_CFunction calls[] = {budget_call, budget_call_each, budget_tick, players_copy};
    for (int i = 0; i < 4; i++) {
        for (int up = 1; up <= 5; up++) lua_pushvalue(L, up);
        lua_pushlstring(L, "_finished", 9);
        lua_pushlstring(L, "tick", 4);
        lua_pushlstring(L, "players", 7);
        lua_pushcclosure(L, calls[i], 8);
    }
    lua_pushcclosure(L, numeric_wrap, 0);
    return 5;
}
