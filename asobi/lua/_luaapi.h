/*
 * The part of the Lua 5.4 API that asobi's Lua C functions (`_tojson.c`, `_pack.c`) use, reached
 * through pointers into the Lua that lupa's `lua54` extension carries.
 *
 * Why pointers: Python loads extensions privately (RTLD_LOCAL), so lupa's Lua is not visible to
 * other libraries.  Making it global (lupa's `allow_lua_module_loading`) would let its symbols
 * bind into any other Lua loaded later; instead `asobi_native_bind` (`_native.c`) looks each
 * function up in that extension once per process (`asobi/lua/native.py`).  No Lua headers are
 * needed: only the functions used are declared, with Lua 5.4's types.
 */
#ifndef ASOBI_LUAAPI_H
#define ASOBI_LUAAPI_H

#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct lua_State lua_State;
typedef long long lua_Integer; /* LUA_INT_LONGLONG, Lua 5.4's default */
typedef double lua_Number;     /* LUA_FLOAT_DOUBLE */
typedef int (*lua_CFunction)(lua_State *L);
typedef struct lua_Debug lua_Debug; /* only ever passed through, never read */
typedef void (*lua_Hook)(lua_State *L, lua_Debug *ar);

struct asobi_lua_api {
    void (*settop)(lua_State *L, int idx);
    int (*checkstack)(lua_State *L, int n);
    int (*type)(lua_State *L, int idx);
    int (*isinteger)(lua_State *L, int idx);
    lua_Integer (*tointegerx)(lua_State *L, int idx, int *isnum);
    lua_Number (*tonumberx)(lua_State *L, int idx, int *isnum);
    int (*toboolean)(lua_State *L, int idx);
    const char *(*tolstring)(lua_State *L, int idx, size_t *len);
    int (*next)(lua_State *L, int idx);
    int (*getmetatable)(lua_State *L, int idx);
    void (*pushnil)(lua_State *L);
    void (*pushboolean)(lua_State *L, int b);
    void (*pushinteger)(lua_State *L, lua_Integer n);
    void (*pushnumber)(lua_State *L, lua_Number n);
    void (*pushvalue)(lua_State *L, int idx);
    const char *(*pushlstring)(lua_State *L, const char *s, size_t len);
    void (*pushcclosure)(lua_State *L, lua_CFunction fn, int n);
    void (*createtable)(lua_State *L, int narr, int nrec);
    int (*rawget)(lua_State *L, int idx);
    void (*rawset)(lua_State *L, int idx);
    int (*rawgeti)(lua_State *L, int idx, lua_Integer n);
    void (*rawseti)(lua_State *L, int idx, lua_Integer n);
    void (*callk)(lua_State *L, int nargs, int nresults, ptrdiff_t ctx, void *k);
    /* The budget machinery's (`_budget.c`). */
    int (*gettop)(lua_State *L);
    void (*rotate)(lua_State *L, int idx, int n);
    int (*pcallk)(lua_State *L, int nargs, int nresults, int errfunc, ptrdiff_t ctx, void *k);
    void (*sethook)(lua_State *L, lua_Hook f, int mask, int count);
    int (*rawgetp)(lua_State *L, int idx, const void *p);
    void (*rawsetp)(lua_State *L, int idx, const void *p);
    const char *(*pushfstring)(lua_State *L, const char *fmt, ...);
    int (*error)(lua_State *L);
    void (*concat)(lua_State *L, int n);
    void (*where)(lua_State *L, int level); /* luaL_where */
};

extern struct asobi_lua_api asobi_lua;
extern int asobi_lua_bound;

#define lua_settop asobi_lua.settop
#define lua_checkstack asobi_lua.checkstack
#define lua_type asobi_lua.type
#define lua_isinteger asobi_lua.isinteger
#define lua_tointegerx asobi_lua.tointegerx
#define lua_tonumberx asobi_lua.tonumberx
#define lua_toboolean asobi_lua.toboolean
#define lua_tolstring asobi_lua.tolstring
#define lua_next asobi_lua.next
#define lua_getmetatable asobi_lua.getmetatable
#define lua_pushnil asobi_lua.pushnil
#define lua_pushboolean asobi_lua.pushboolean
#define lua_pushinteger asobi_lua.pushinteger
#define lua_pushnumber asobi_lua.pushnumber
#define lua_pushvalue asobi_lua.pushvalue
#define lua_pushlstring asobi_lua.pushlstring
#define lua_pushcclosure asobi_lua.pushcclosure
#define lua_createtable asobi_lua.createtable
#define lua_rawget asobi_lua.rawget
#define lua_rawset asobi_lua.rawset
#define lua_rawgeti asobi_lua.rawgeti
#define lua_rawseti asobi_lua.rawseti
#define lua_call(L, nargs, nresults) asobi_lua.callk(L, nargs, nresults, 0, NULL)
#define lua_gettop asobi_lua.gettop
#define lua_rotate asobi_lua.rotate
#define lua_pcall(L, nargs, nresults, errfunc) asobi_lua.pcallk(L, nargs, nresults, errfunc, 0, NULL)
#define lua_sethook asobi_lua.sethook
#define lua_rawgetp asobi_lua.rawgetp
#define lua_rawsetp asobi_lua.rawsetp
#define lua_pushfstring asobi_lua.pushfstring
#define lua_error asobi_lua.error
#define lua_concat asobi_lua.concat
#define luaL_where asobi_lua.where
#define lua_insert(L, idx) lua_rotate(L, (idx), 1)
#define lua_pop(L, n) lua_settop(L, -(n)-1)

/* Lua 5.4's pseudo-indices, for LUAI_MAXSTACK = 1000000 (luaconf.h's value for 32-bit ints).
 * `_budget.c` checks the registry is there before it relies on them. */
#define LUA_REGISTRYINDEX (-1000000 - 1000)
#define lua_upvalueindex(i) (LUA_REGISTRYINDEX - (i))
#define LUA_MULTRET (-1)
#define LUA_OK 0
#define LUA_MASKCOUNT (1 << 3)

#define LUA_TNIL 0
#define LUA_TBOOLEAN 1
#define LUA_TNUMBER 3
#define LUA_TSTRING 4
#define LUA_TTABLE 5

/* An output buffer.  Each thread has one (`asobi_buffer`), reused by every call: a result is
 * written there, then copied into a Lua string (`asobi_push_buffer`), so it holds nothing between
 * calls.  It is written in place, never through a copy of this struct: a Lua call that raises
 * mid-way (out of memory) must leave it pointing at memory realloc did not move. */
typedef struct {
    char *b;
    size_t n, cap;
} Bytes;

int asobi_bytes_grow(Bytes *o, size_t more);
/* The calling thread's buffer, emptied. */
Bytes *asobi_buffer(void);
/* Pushes the buffer's bytes as a Lua string; a buffer grown past 1 MiB by one large result is
 * given back afterwards. */
void asobi_push_buffer(lua_State *L, Bytes *o);

static inline int reserve(Bytes *o, size_t more) {
    return o->n + more <= o->cap || asobi_bytes_grow(o, more);
}

static inline int put(Bytes *o, const char *s, size_t n) {
    if (!reserve(o, n)) return 0;
    memcpy(o->b + o->n, s, n);
    o->n += n;
    return 1;
}

/* The host's clock, `time.perf_counter()` on Linux: CLOCK_MONOTONIC, nanoseconds over 1e9. */
static inline double asobi_clock_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)((long long)ts.tv_sec * 1000000000 + ts.tv_nsec) / 1e9;
}

#endif
