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

typedef struct lua_State lua_State;
typedef long long lua_Integer; /* LUA_INT_LONGLONG, Lua 5.4's default */
typedef double lua_Number;     /* LUA_FLOAT_DOUBLE */
typedef int (*lua_CFunction)(lua_State *L);

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

#endif
