# asobi: Lua-scripted multiplayer match server.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    ASOBI_HOST=0.0.0.0 \
    ASOBI_PORT=8080 \
    ASOBI_GAME_DIR=/game \
    ASOBI_DATA_DIR=/data

# Extras to install: compose runs on SQLite and needs none; `--build-arg ASOBI_EXTRAS=postgres`
# for an image that uses ASOBI_DATABASE_URL=postgresql://..., `cluster` for a cluster node
# (Redis and PostgreSQL drivers; compose's cluster profile builds that one).
ARG ASOBI_EXTRAS=""

# Built from /src, which is then removed: `python -m asobi` must find the installed package (with
# its compiled encoder), never a source tree in the working directory.
COPY pyproject.toml README.md /src/
COPY asobi /src/asobi
WORKDIR /app
# A C compiler only while installing: it builds asobi's C parts (asobi/lua/_native.c: the state
# frames' JSON encoder and the snapshot packer; asobi/_merge_patch.c: the patch diff;
# asobi/_send.c: the sends at the end of a tick pass; without them the server does that work in
# Python and Lua, with more CPU).
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && pip install "/src${ASOBI_EXTRAS:+[$ASOBI_EXTRAS]}" \
 && python -I -c "from asobi.lua import native; assert native.library(), 'asobi/lua/_native.c not built'; import asobi._merge_patch, asobi._send" \
 && apt-get purge -y --auto-remove gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* /src \
 && useradd --create-home --uid 10001 asobi \
 && mkdir -p /game /data \
 && chown asobi:asobi /data

COPY --chown=asobi:asobi game /game

USER asobi
EXPOSE 8080
VOLUME ["/data"]
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s \
  CMD python -c "import os,sys,urllib.request; port=os.environ.get('ASOBI_PORT') or '8080'; sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=2).status == 200 else 1)"

CMD ["asobi", "serve"]
