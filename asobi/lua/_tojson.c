/*
 * A Lua C function that writes a `get_state` result as JSON text inside the match's Lua state.
 *
 * Why: crossing into Python one value at a time (lupa's `items()`, one Python object per key and
 * value) and then encoding those objects again was a third of the server's CPU per state frame.
 * Written here, one call turns the whole table into the frame's JSON body; only the text crosses.
 *
 * It is a fast path, never the judge: it writes only what `asobi.lua.convert.to_python` followed
 * by `orjson.dumps` would accept, and returns nil for anything else (a value that is not data,
 * NaN or infinity, text that is not UTF-8, a table nested too deep or holding too many values,
 * integer keys outside a sequence in order, float or boolean keys, mixed key types).  The host
 * then walks the table itself and gives the exact error, or handles the rare shape.  Tables are
 * read raw (`lua_next`), as the host's walk reads them: no metamethod runs.
 *
 * Opened by `_native.c`; the Lua API through `_luaapi.h`.
 */
#include <math.h>
#include <stdio.h>

#include "_luaapi.h"

/* The same bound as convert.MAX_DEPTH: deeper is refused (a cycle, most likely). */
#define MAX_DEPTH 32
typedef struct {
    Bytes *bytes;
    lua_Integer budget; /* values still allowed, as convert.to_python counts them */
} Out;

/* Strict UTF-8, as Python's decoder: no overlong forms, no surrogates, nothing past U+10FFFF. */
static int valid_utf8(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        if (c < 0x80) {
            i++;
        } else if (c >= 0xC2 && c <= 0xDF) {
            if (i + 1 >= n || (s[i + 1] & 0xC0) != 0x80) return 0;
            i += 2;
        } else if (c >= 0xE0 && c <= 0xEF) {
            if (i + 2 >= n) return 0;
            unsigned c1 = s[i + 1];
            if ((c1 & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80) return 0;
            if ((c == 0xE0 && c1 < 0xA0) || (c == 0xED && c1 > 0x9F)) return 0;
            i += 3;
        } else if (c >= 0xF0 && c <= 0xF4) {
            if (i + 3 >= n) return 0;
            unsigned c1 = s[i + 1];
            if ((c1 & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80 || (s[i + 3] & 0xC0) != 0x80)
                return 0;
            if ((c == 0xF0 && c1 < 0x90) || (c == 0xF4 && c1 > 0x8F)) return 0;
            i += 4;
        } else {
            return 0;
        }
    }
    return 1;
}

static const char HEX[] = "0123456789abcdef";

/* A JSON string, escaped as orjson escapes: quote, backslash and control characters only. */
static int put_text(Bytes *o, const char *s, size_t n) {
    if (!valid_utf8((const unsigned char *)s, n)) return 0;
    if (!reserve(o, 1)) return 0;
    o->b[o->n++] = '"';
    char *w = o->b + o->n;
    for (size_t i = 0; i < n; i++) {
        if ((i & 1023) == 0) {
            /* Room for the next 1,024 bytes escaped at worst (6 each), then the closing quote. */
            o->n = (size_t)(w - o->b);
            if (!reserve(o, 6 * 1024 + 1)) return 0;
            w = o->b + o->n;
        }
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\') {
            *w++ = (char)c;
            continue;
        }
        *w++ = '\\';
        switch (c) {
        case '"': *w++ = '"'; break;
        case '\\': *w++ = '\\'; break;
        case '\n': *w++ = 'n'; break;
        case '\r': *w++ = 'r'; break;
        case '\t': *w++ = 't'; break;
        case '\b': *w++ = 'b'; break;
        case '\f': *w++ = 'f'; break;
        default:
            *w++ = 'u';
            *w++ = '0';
            *w++ = '0';
            *w++ = HEX[c >> 4];
            *w++ = HEX[c & 15];
        }
    }
    o->n = (size_t)(w - o->b);
    return put(o, "\"", 1);
}

static char *put_digits(char *w, unsigned long long v) {
    char tmp[24];
    int i = 0;
    do {
        tmp[i++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (i) *w++ = tmp[--i];
    return w;
}

static const double POW10[] = {1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8};

/* Integers in decimal; floats as the shortest text that reads back as the same double.  Most
 * game values (1.5, -0.25, 12.375, 0.1) have at most 8 decimals and take the fast path, which
 * writes what Python's repr and orjson write; the rest go through printf at 15 to 17 digits. */
static int put_number(Bytes *o, lua_State *L, int idx) {
    if (!reserve(o, 40)) return 0;
    char *w = o->b + o->n;
    if (lua_isinteger(L, idx)) {
        lua_Integer v = lua_tointegerx(L, idx, NULL);
        unsigned long long u = (unsigned long long)v;
        if (v < 0) {
            *w++ = '-';
            u = 0 - u;
        }
        w = put_digits(w, u);
        o->n = (size_t)(w - o->b);
        return 1;
    }
    double d = lua_tonumberx(L, idx, NULL);
    if (!isfinite(d)) return 0;
    double a = fabs(d);
    if (a == 0) {
        const char *zero = signbit(d) ? "-0.0" : "0.0";
        return put(o, zero, strlen(zero));
    }
    if (a >= 1e-4 && a < 1e15) {
        for (int k = 0; k <= 8; k++) {
            double scaled = a * POW10[k];
            if (scaled >= 9e15) break;
            double whole = nearbyint(scaled);
            /* m / 10^k, both exact, divides to the double nearest that decimal, which is what
             * reading the k-decimal text gives: if that is a, the text reads back as a, and no
             * shorter one did. */
            if (whole / POW10[k] != a) continue;
            unsigned long long m = (unsigned long long)whole;
            unsigned long long unit = (unsigned long long)POW10[k];
            if (signbit(d)) *w++ = '-';
            w = put_digits(w, m / unit);
            *w++ = '.';
            if (k == 0) {
                *w++ = '0';
            } else {
                unsigned long long frac = m % unit;
                for (int j = k - 1; j >= 0; j--) {
                    w[j] = (char)('0' + frac % 10);
                    frac /= 10;
                }
                w += k;
            }
            o->n = (size_t)(w - o->b);
            return 1;
        }
    }
    int len = 0;
    for (int digits = 15; digits <= 17; digits++) {
        len = snprintf(w, 36, "%.*g", digits, d);
        if (strtod(w, NULL) == d) break;
    }
    /* "1e+16" reads back as a float; "1000000000000001" would read back as an integer. */
    if (!memchr(w, '.', (size_t)len) && !memchr(w, 'e', (size_t)len)) {
        memcpy(w + len, ".0", 2);
        len += 2;
    }
    o->n += (size_t)len;
    return 1;
}

static int put_value(Out *o, lua_State *L, int idx, int depth);

/* The table at the top of the stack, `t`: a JSON array when its keys are 1..n in order, an
 * object when they are all strings, the empty object when it has none; otherwise 0 (the host
 * decides).  While walking it, its key is at t + 1 and its value at t + 2, the new top. */
static int put_table(Out *o, lua_State *L, int t, int depth) {
    if (depth >= MAX_DEPTH || !lua_checkstack(L, 3)) return 0;
    if (--o->budget < 0) return 0;
    lua_pushnil(L);
    if (!lua_next(L, t)) return put(o->bytes, "{}", 2);
    int ok = 1;
    const int key = t + 1, value = t + 2;
    if (lua_type(L, key) == LUA_TNUMBER && lua_isinteger(L, key) &&
        lua_tointegerx(L, key, NULL) == 1) {
        ok = put(o->bytes, "[", 1);
        lua_Integer expected = 1;
        do {
            if (lua_type(L, key) != LUA_TNUMBER || !lua_isinteger(L, key) ||
                lua_tointegerx(L, key, NULL) != expected || --o->budget < 0) {
                ok = 0;
                break;
            }
            ok = (expected == 1 || put(o->bytes, ",", 1)) && put_value(o, L, value, depth + 1);
            lua_settop(L, key);
            expected++;
        } while (ok && lua_next(L, t));
        ok = ok && put(o->bytes, "]", 1);
    } else {
        ok = put(o->bytes, "{", 1);
        int first = 1;
        do {
            size_t len;
            if (lua_type(L, key) != LUA_TSTRING || --o->budget < 0) {
                ok = 0;
                break;
            }
            const char *text = lua_tolstring(L, key, &len);
            ok = (first || put(o->bytes, ",", 1)) && put_text(o->bytes, text, len) &&
                 put(o->bytes, ":", 1) && put_value(o, L, value, depth + 1);
            first = 0;
            lua_settop(L, key);
        } while (ok && lua_next(L, t));
        ok = ok && put(o->bytes, "}", 1);
    }
    lua_settop(L, t);
    return ok;
}

static int put_value(Out *o, lua_State *L, int idx, int depth) {
    switch (lua_type(L, idx)) {
    case LUA_TBOOLEAN:
        return lua_toboolean(L, idx) ? put(o->bytes, "true", 4) : put(o->bytes, "false", 5);
    case LUA_TNUMBER:
        return put_number(o->bytes, L, idx);
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        return put_text(o->bytes, s, len);
    }
    case LUA_TTABLE:
        return put_table(o, L, idx, depth);
    case LUA_TNIL:
        return depth == 0 && put(o->bytes, "null", 4);
    default:
        return 0; /* functions, userdata, threads: not data */
    }
}

/* tojson(value, max_nodes) -> the JSON text, or nil when the host must convert it itself. */
int asobi_tojson(lua_State *L) {
    Out o = {asobi_buffer(), lua_tointegerx(L, 2, NULL)};
    lua_settop(L, 1);
    if (!put_value(&o, L, 1, 0)) {
        lua_pushnil(L);
        return 1;
    }
    asobi_push_buffer(L, o.bytes);
    return 1;
}
