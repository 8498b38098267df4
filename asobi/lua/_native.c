/*
 * asobi's Lua C functions, loaded into each match's Lua state by the host with `package.loadlib`
 * (never by a script): the JSON encoder of state frames (`_tojson.c`), the snapshot packer
 * (`_pack.c`), the budgeted calls of the tick path (`_budget.c`) and the clock of budgets (`now`,
 * below).  This file binds them to the Lua API
 * (`_luaapi.h`) and opens them.
 */
#include <dlfcn.h>

#include "_luaapi.h"

struct asobi_lua_api asobi_lua;
int asobi_lua_bound;

/* A buffer grown past this by one large result is given back once it is pushed. */
#define KEEP_BYTES (1 << 20)

static __thread Bytes buffer;

Bytes *asobi_buffer(void) {
    buffer.n = 0;
    return &buffer;
}

void asobi_push_buffer(lua_State *L, Bytes *o) {
    lua_pushlstring(L, o->b, o->n);
    if (o->cap > KEEP_BYTES) {
        free(o->b);
        o->b = NULL;
        o->cap = 0;
    }
}

int asobi_bytes_grow(Bytes *o, size_t more) {
    size_t cap = o->cap ? o->cap : 4096;
    while (cap < o->n + more) cap *= 2;
    char *grown = realloc(o->b, cap);
    if (grown == NULL) return 0;
    o->b = grown;
    o->cap = cap;
    return 1;
}

/* Look the Lua API up in the already loaded library at `path` (lupa's lua54 extension); 1 when
 * every function was found.  Called by the host before any Lua state opens these functions. */
int asobi_native_bind(const char *path) {
    void *library = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (library == NULL) return 0;
#define BIND(name)                                                                             \
    if ((*(void **)&asobi_lua.name = dlsym(library, "lua_" #name)) == NULL) return 0;
    BIND(settop) BIND(checkstack) BIND(type) BIND(isinteger) BIND(tointegerx) BIND(tonumberx)
    BIND(toboolean) BIND(tolstring) BIND(next) BIND(getmetatable) BIND(pushnil)
    BIND(pushboolean) BIND(pushinteger) BIND(pushnumber) BIND(pushvalue) BIND(pushlstring) BIND(pushcclosure)
    BIND(createtable) BIND(rawget) BIND(rawset) BIND(rawgeti) BIND(rawseti) BIND(callk)
    BIND(gettop) BIND(rotate) BIND(pcallk) BIND(sethook) BIND(rawgetp) BIND(rawsetp)
    BIND(pushfstring) BIND(error) BIND(concat)
#undef BIND
    if ((*(void **)&asobi_lua.where = dlsym(library, "luaL_where")) == NULL) return 0;
    asobi_lua_bound = 1;
    return 1;
}

int asobi_tojson(lua_State *L);
int asobi_pack(lua_State *L);
int asobi_budget(lua_State *L);

/* The host's clock, `time.perf_counter()`, read without calling into Python: the budgets' clock
 * is read before every get_state call, every input call and every 1,000 instructions (calls.lua),
 * and each reading through Python crossed lupa's call machinery.  The same clock and the same
 * rounding as CPython's on Linux (CLOCK_MONOTONIC, nanoseconds over 1e9); the host checks that the
 * two agree before it uses this one (`asobi.lua.native`). */
static int asobi_now(lua_State *L) {
    lua_pushnumber(L, asobi_clock_now());
    return 1;
}

/* The loader: a table of the functions ("tojson", "pack", "now", "budget"), or nothing at all
 * when the API was never bound (the host then does that work itself). */
int luaopen_asobi_native(lua_State *L) {
    if (!asobi_lua_bound) return 0;
    lua_createtable(L, 0, 4);
    lua_pushlstring(L, "tojson", 6);
    lua_pushcclosure(L, asobi_tojson, 0);
    lua_rawset(L, -3);
    lua_pushlstring(L, "pack", 4);
    lua_pushcclosure(L, asobi_pack, 0);
    lua_rawset(L, -3);
    lua_pushlstring(L, "now", 3);
    lua_pushcclosure(L, asobi_now, 0);
    lua_rawset(L, -3);
    lua_pushlstring(L, "budget", 6);
    lua_pushcclosure(L, asobi_budget, 0);
    lua_rawset(L, -3);
    return 1;
}
