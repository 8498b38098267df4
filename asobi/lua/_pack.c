/*
 * A match's state written in pack.lua's snapshot format, in C: the same bytes as `P.pack`.
 *
 * Why: the snapshot runs on the tick path, once a second for every match, and pack.lua's walk
 * (a `string.pack` call per run of tables, its arguments gathered in Lua) was most of what a
 * snapshot costs.  This walks the state in the same order (breadth first, tables numbered as
 * they are met, keys before values, `lua_next` order within a table) and writes the same layout:
 * "ASN1", then per table a uint32 pair count and its pairs; a value is a tag byte and its bytes
 * (1 string with a uint32 length, 2 int64, 3 double, 4 true, 5 false, 6 uint32 table number),
 * all little-endian.
 *
 * pack.lua stays the judge: for anything it refuses (a function, a table with a metatable, a
 * string too long for its length field) this returns nil, and the host runs pack.lua, whose
 * error names the path.  Past the deadline it returns false.  Opened by `_native.c`.
 */
#include <stdint.h>

#include "_luaapi.h"

/* Pairs and tables between two looks at the clock, as in pack.lua. */
#define CHECK_EVERY 1024

/* Stack slots of `asobi_pack`. */
enum { ROOT = 1, DEADLINE, NOW, IDS, QUEUE, SRC, KEY, VALUE };

static inline int put_byte(Bytes *o, unsigned v) {
    if (!reserve(o, 1)) return 0;
    o->b[o->n++] = (char)v;
    return 1;
}

static inline void store_u32(char *at, uint32_t v) {
    for (int i = 0; i < 4; i++) at[i] = (char)(v >> (8 * i));
}

static inline int put_tagged(Bytes *o, unsigned tag, uint64_t v, int bytes) {
    if (!reserve(o, 1 + (size_t)bytes)) return 0;
    char *w = o->b + o->n;
    *w++ = (char)tag;
    for (int i = 0; i < bytes; i++) w[i] = (char)(v >> (8 * i));
    o->n += 1 + (size_t)bytes;
    return 1;
}

typedef struct {
    Bytes *o;
    lua_Integer tables; /* tables numbered so far */
} Walk;

/* The key or value at `idx` (an absolute slot): 0 when pack.lua must write it. */
static int put_item(Walk *w, lua_State *L, int idx) {
    Bytes *o = w->o;
    switch (lua_type(L, idx)) {
    case LUA_TSTRING: {
        size_t n;
        const char *s = lua_tolstring(L, idx, &n);
        if (n > UINT32_MAX) return 0;
        return put_tagged(o, 1, n, 4) && put(o, s, n);
    }
    case LUA_TNUMBER:
        if (lua_isinteger(L, idx)) return put_tagged(o, 2, (uint64_t)lua_tointegerx(L, idx, NULL), 8);
        {
            double d = lua_tonumberx(L, idx, NULL);
            uint64_t bits;
            memcpy(&bits, &d, sizeof bits);
            return put_tagged(o, 3, bits, 8);
        }
    case LUA_TBOOLEAN:
        return put_byte(o, lua_toboolean(L, idx) ? 4 : 5);
    case LUA_TTABLE: {
        lua_Integer id;
        lua_pushvalue(L, idx);
        if (lua_rawget(L, IDS) != LUA_TNIL) {
            id = lua_tointegerx(L, -1, NULL);
            lua_settop(L, -2);
        } else {
            lua_settop(L, -2);
            if (lua_getmetatable(L, idx)) {
                lua_settop(L, -2);
                return 0;
            }
            id = ++w->tables;
            if (id > UINT32_MAX) return 0;
            lua_pushvalue(L, idx);
            lua_pushinteger(L, id);
            lua_rawset(L, IDS);
            lua_pushvalue(L, idx);
            lua_rawseti(L, QUEUE, id);
        }
        return put_tagged(o, 6, (uint64_t)id, 4);
    }
    default:
        return 0; /* functions, userdata, threads: pack.lua refuses them */
    }
}

/* Whether the host clock (the function at NOW) is past the deadline. */
static int past(lua_State *L, lua_Number deadline, int top) {
    lua_pushvalue(L, NOW);
    lua_call(L, 0, 1);
    lua_Number now = lua_tonumberx(L, -1, NULL);
    lua_settop(L, top);
    return now > deadline;
}

/* pack(root, deadline, now) -> the packed state as one string; nil when pack.lua must write it;
 * false once `now()` is past `deadline`. */
int asobi_pack(lua_State *L) {
    lua_settop(L, NOW);
    if (lua_type(L, ROOT) != LUA_TTABLE || !lua_checkstack(L, 8)) {
        lua_pushnil(L);
        return 1;
    }
    if (lua_getmetatable(L, ROOT)) {
        lua_pushnil(L);
        return 1;
    }
    lua_Number deadline = lua_tonumberx(L, DEADLINE, NULL);
    lua_createtable(L, 0, 8); /* IDS: table -> its number */
    lua_createtable(L, 8, 0); /* QUEUE: number -> table */
    lua_pushvalue(L, ROOT);
    lua_pushinteger(L, 1);
    lua_rawset(L, IDS);
    lua_pushvalue(L, ROOT);
    lua_rawseti(L, QUEUE, 1);

    Bytes *o = asobi_buffer();
    Walk w = {o, 1};
    int result = put(o, "ASN1", 4) ? 1 : 0; /* 1 written, 0 for pack.lua, -1 past the deadline */
    int work = 0;
    for (lua_Integer i = 1; result == 1 && i <= w.tables; i++) {
        lua_rawgeti(L, QUEUE, i); /* SRC */
        if (++work >= CHECK_EVERY) {
            work = 0;
            if (past(L, deadline, SRC)) result = -1;
        }
        size_t count_at = o->n;
        uint32_t count = 0;
        if (result == 1 && !reserve(o, 4)) result = 0;
        o->n += result == 1 ? 4 : 0;
        lua_pushnil(L);
        while (result == 1 && lua_next(L, SRC)) {
            if (!put_item(&w, L, KEY) || !put_item(&w, L, VALUE)) {
                result = 0;
                break;
            }
            count++;
            lua_settop(L, KEY);
            if (++work >= CHECK_EVERY) {
                work = 0;
                if (past(L, deadline, KEY)) result = -1;
            }
        }
        if (result == 1) store_u32(o->b + count_at, count);
        lua_settop(L, QUEUE);
    }
    lua_settop(L, QUEUE);
    if (result == 1) {
        asobi_push_buffer(L, o);
    } else if (result == -1) {
        lua_pushboolean(L, 0);
    } else {
        lua_pushnil(L);
    }
    return 1;
}
