"""The server's parts wired together, without any I/O of its own.

`App` is what the socket layer (`asobi.server`) and the tests hold: settings, the script
registry, the engine, the matchmaker, the player hub, token signing and reload history.
`App.create` is the one place that chooses the implementations of the `asobi.directory`
interfaces the sessions and the matchmaker talk to: on a single node, the `Local*` ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from asobi.accounts import Accounts
from asobi.auth import TokenSigner, load_or_create_secret
from asobi.config import Settings
from asobi.directory import MatchListing, MatchRouter, Placement
from asobi.engine import Engine, EngineConfig
from asobi.hub import Hub
from asobi.journal import Journal, StoreJournal
from asobi.local import LocalListing, LocalPlacement, LocalRouter
from asobi.matchmaker import Matchmaker, TicketQueue
from asobi.metrics import Metrics
from asobi.presence import Presence
from asobi.recording import Recorder
from asobi.reload import Reloader, ReloadHistory
from asobi.restore import restore_matches
from asobi.scripts import ScriptError, ScriptRegistry
from asobi.snapshots import Snapshotter
from asobi.store import Store, open_backend

if TYPE_CHECKING:
    from asobi.cluster import Cluster
    from asobi.cluster.drain import Drainer
    from asobi.cluster.reloads import ClusterReloader

log = structlog.get_logger("asobi.app")


@dataclass
class App:
    settings: Settings
    registry: ScriptRegistry
    engine: Engine
    hub: Hub
    matchmaker: TicketQueue
    signer: TokenSigner
    history: ReloadHistory
    reloader: Reloader
    load_errors: list[ScriptError]
    presence: Presence
    router: MatchRouter
    listing: MatchListing
    placement: Placement
    metrics: Metrics = field(default_factory=Metrics)
    store: Store | None = field(default=None)
    accounts: Accounts | None = field(default=None)
    # This node's place in a cluster (ASOBI_REDIS_URL); None on a single node.
    cluster: Cluster | None = field(default=None)
    # `asobi push` and the cluster's reload records (docs/cluster.md); None on a single node.
    cluster_reloader: ClusterReloader | None = field(default=None)
    # Matches' latest snapshots (docs/durability.md); None with ASOBI_SNAPSHOT_TICKS < 0.
    journal: Journal | None = field(default=None)
    # Moves this node's matches to other nodes (`asobi drain`, SIGTERM); None on a single node.
    drainer: Drainer | None = field(default=None)

    @classmethod
    def create(cls, settings: Settings) -> App:
        registry = ScriptRegistry(
            settings.game_dir,
            settings.limits,
            strict_modes=settings.strict_modes,
            max_script_bytes=settings.max_script_bytes,
        )
        load_errors = registry.load_all()
        for error in load_errors:
            log.error("script_rejected", **error.as_log())
        for name in registry.names():
            for problem in registry.unresolved_requires(name):
                log.warning("script_require_unresolved", script=name, error=problem)
        if not registry.names():
            log.error(
                "no_playable_scripts",
                game_dir=str(registry.game_dir),
                rejected=len(load_errors),
                hint="the server is not ready until a script loads; fix and save one",
            )
        hub = Hub()
        engine = Engine(
            registry,
            hub,
            EngineConfig(
                limits=settings.limits,
                max_consecutive_failures=settings.max_consecutive_failures,
                match_seed=settings.match_seed,
                max_queued_inputs=settings.max_queued_inputs,
                reload_switches_per_tick=settings.reload_switches_per_tick,
            ),
        )
        secret = load_or_create_secret(settings.data_dir, settings.secret)
        history = ReloadHistory()
        store = Store(open_backend(settings.database_url, settings.data_dir))
        engine.store = store
        metrics = Metrics()
        placement = LocalPlacement(registry, engine)
        app = cls(
            settings=settings,
            registry=registry,
            engine=engine,
            hub=hub,
            matchmaker=Matchmaker(
                registry,
                placement,
                hub,
                ticket_ttl_s=settings.ticket_ttl_s,
                max_queues=settings.max_queues,
                max_tickets_per_player=settings.max_tickets_per_player,
                on_error=metrics.error,
            ),
            signer=TokenSigner(secret, settings.token_ttl_s),
            history=history,
            reloader=Reloader(registry, engine, history),
            load_errors=load_errors,
            store=store,
            accounts=Accounts(store),
            metrics=metrics,
            presence=Presence(settings.reconnect_grace_s),
            router=LocalRouter(engine),
            listing=LocalListing(engine),
            placement=placement,
        )
        if settings.snapshot_ticks >= 0:
            app.use_journal(StoreJournal(store.backend))
        if settings.record:
            engine.recorder = Recorder(store.backend, registry)
            engine.listeners.append(engine.recorder)
        if settings.redis_url:
            app.cluster = join_cluster(app, secret)
        return app

    def use_journal(self, journal: Journal | None) -> None:
        """Keep matches' snapshots in `journal` (docs/durability.md); None: keep none."""
        engine = self.engine
        self.journal = journal
        if journal is None:
            if engine.snapshots is not None:
                engine.listeners.remove(engine.snapshots)
                engine.snapshots = None
            return
        if engine.snapshots is None:
            engine.snapshots = Snapshotter(
                journal, self.presence.token_of, every_ticks=self.settings.snapshot_ticks
            )
            engine.listeners.append(engine.snapshots)
        engine.snapshots.journal = journal
        engine.snapshots.resume_token = self.presence.token_of  # a cluster swaps the seats

    def unplayable(self) -> str | None:
        """Why no match can start (no script in force), or None.  `/ready` says it."""
        if self.registry.names():
            return None
        rejected = self.registry.rejected_count()
        if rejected:
            return f"every script in {self.registry.game_dir} was rejected ({rejected})"
        return f"no scripts in {self.registry.game_dir}"

    async def open(self, port: int = 0) -> None:
        """Open what needs I/O before serving (the database, the cluster); `port` is the one the
        server listens on, which a node announces to the cluster unless ASOBI_PUBLIC_URL says
        otherwise."""
        if self.store is not None:
            await self.store.start()
        if self.journal is not None:
            await self.journal.start()
            await restore_matches(self)
        if self.engine.recorder is not None:
            await self.engine.recorder.start()
        if self.cluster is not None:
            await self.cluster.start(port)

    async def close(self) -> None:
        """Write out what is pending and release resources."""
        if self.cluster is not None:
            await self.cluster.stop()
        if self.accounts is not None:
            self.accounts.close()
        if self.journal is not None:
            # A clean stop keeps every match: the next start restores it without a lost tick.
            if self.engine.snapshots is not None:
                self.engine.snapshots.take_all(self.engine)
            await self.journal.stop()
        if self.engine.recorder is not None:
            await self.engine.recorder.stop()
        if self.store is not None:
            await self.store.stop()


def join_cluster(app: App, secret: str) -> Cluster:
    """Make this app a node of the cluster at ASOBI_REDIS_URL: the one place that swaps the
    single-node parts for the cluster's (docs/cluster.md)."""
    from asobi.extras import require

    require("redis", "cluster", "ASOBI_REDIS_URL names a Redis server")
    from asobi.cluster import Cluster
    from asobi.cluster.node import check_settings

    check_settings(app.settings)

    def load() -> dict[str, float]:
        recent = list(app.metrics.recent_lateness)[-2000:]
        recent.sort()
        p99 = recent[int(len(recent) * 0.99)] * 1000 if recent else 0.0
        return {
            "matches": len(app.engine.matches),
            "players": len(app.hub),
            "lateness_p99_ms": max(p99, 0.0),
        }

    cluster = Cluster(app.settings, secret, load)

    _reload_across(app, cluster)
    _reach_other_nodes(app, cluster)
    _match_across(app, cluster)
    _share_data(app, cluster)
    _outlive_nodes(app, cluster)
    return cluster


def _outlive_nodes(app: App, cluster: Cluster) -> None:
    """Snapshots in Redis, marked with their node (the store's database is shared: a node
    starting must not restore its live neighbours' matches from it); a dead node's matches
    adopted by the others, a draining node's handed over (docs/durability.md, "In a
    cluster")."""
    if app.settings.snapshot_ticks < 0:
        app.use_journal(None)
        return
    from asobi.cluster.drain import Drainer
    from asobi.cluster.failover import Failover
    from asobi.cluster.journal import RedisJournal
    from asobi.cluster.seats import ClusterSeats

    backend = app.store.backend if app.store is not None else None
    journal = RedisJournal(cluster.link, incarnation=cluster.incarnation, backend=backend)
    app.use_journal(journal)
    assert isinstance(app.presence, ClusterSeats)
    failover = Failover(app, cluster, journal, app.presence)
    app.drainer = Drainer(app, cluster, journal, failover)
    cluster.on_start(failover.start, failover.stop)
    cluster.on_start(_nothing, app.drainer.stop)


async def _nothing() -> None:
    """A part with nothing to start (its bus handlers are registered when it is built)."""


def _reload_across(app: App, cluster: Cluster) -> None:
    """`asobi push` bundles applied on every node (docs/cluster.md, "Reload across the
    cluster")."""
    from asobi.cluster.reloads import ClusterReloader

    app.cluster_reloader = ClusterReloader(
        cluster.link, cluster.nodes, app.reloader, app.settings.max_script_bytes
    )
    cluster.on_start(app.cluster_reloader.start, app.cluster_reloader.stop)


def _reach_other_nodes(app: App, cluster: Cluster) -> None:
    """Resume tokens that name their node, seat tokens honoured, `match.list` and `match.join`
    across the cluster (docs/cluster.md, "Reaching a match on another node")."""
    from asobi.cluster.listing import ClusterListing
    from asobi.cluster.router import ClusterRouter, match_id_prefix
    from asobi.cluster.seats import ClusterSeats

    settings = app.settings
    app.presence = ClusterSeats(settings.reconnect_grace_s, cluster.nodes, cluster.seat_tokens)
    listing = ClusterListing(
        LocalListing(app.engine),
        cluster.link,
        cluster.nodes,
        interval_s=settings.heartbeat_s,
        ttl_s=settings.node_ttl_s,
    )
    app.listing = listing
    app.router = ClusterRouter(app.engine, listing, cluster.nodes, cluster.seat_tokens)
    app.engine.match_id_prefix = match_id_prefix(cluster.node_id)
    cluster.on_start(listing.start, listing.stop)


def _match_across(app: App, cluster: Cluster) -> None:
    """One matchmaker for the cluster: tickets in Redis, matches placed on the node holding most
    of their players (app.placement stays this node's: the placing node starts matches with it)
    (docs/cluster.md, "One matchmaker")."""
    from asobi.cluster.matchmaker import RedisMatchmaker

    matchmaker = RedisMatchmaker(app, cluster)
    app.matchmaker = matchmaker
    cluster.on_start(matchmaker.start, matchmaker.stop)


def _share_data(app: App, cluster: Cluster) -> None:
    """Leaderboards and global storage seen live on every node; a player's wallet resident on
    one node at a time (docs/cluster.md, "Shared data")."""
    if app.store is None:
        return
    from asobi.cluster.store_sync import PostgresStoreSync
    from asobi.cluster.wallets import WalletHandover

    wallets = WalletHandover(cluster.link, cluster.nodes, app.store, cluster.node_id)
    sync = PostgresStoreSync(app.store, app.settings.database_url, cluster.node_id, wallets)
    app.store.sync = sync
    cluster.on_start(sync.start, sync.stop)
