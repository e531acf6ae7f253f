"""``talkbridge run | worker | check-config | status | dlq``, and the subcommands
adapters register (``Adapter.cli_commands``: ``talk-bot-command``).

Exit codes: 0 fine, 1 runtime failure, 2 bad config or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from adapters import AdapterRegistry
from bridge.adapter import Adapter, CliCommand
from bridge.admin import fleet  # what the management page reads too
from bridge.bus import bus_for
from bridge.config import Config, ConfigError, load_config
from bridge.connections import RedisURLError, connect, embedded_for, redis_for
from bridge.embedded_redis import EmbeddedRedis, EmbeddedRedisError
from bridge.logstream import LogStream
from bridge.logstream import install as install_log_stream
from bridge.options import protocol_specs
from bridge.redis_watch import describe, master_address, read_record

if TYPE_CHECKING:
    from redis.asyncio import Redis

GC_GEN0_THRESHOLD = 20_000  # CPython's default, 700, collects every few requests
GC_FULL_EVERY = 10.0  # seconds between full collections (cycles left by httpx: collect_cycles)
EXIT_RUNTIME = 1
FILES_RESERVED = 256  # open files besides client connections: Redis, logs, the embedded server's pipes
EXIT_CONFIG = 2
WAIT_FOR_REDIS = 60.0  # seconds a worker waits for the daemon's embedded Redis (talkbridge worker --wait-for-redis)
REDIS_POLL = 0.25  # seconds between its looks


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(config: Config, stream: TextIO = sys.stderr) -> None:
    handler = logging.StreamHandler(stream)
    if config.log.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log.level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # httpx logs every request's URL at INFO: a URL may carry a credential (an
    # endpoint's key in its query), and the workers make a request per job
    logging.getLogger("httpx").setLevel(logging.WARNING)


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed: the daemon is network-bound Python, and uvloop's
    libuv transports roughly halve the per-request overhead of the event loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def load(path: str, adapters: Mapping[str, type[Adapter]]) -> Config:
    # the features' declarations only (their sections, switches and tables): no arq, no HTTP client
    from workers.feature_settings import FEATURE_SPECS

    return load_config(path, protocol_specs(adapters), features=FEATURE_SPECS)


# commands ------------------------------------------------------------------------
def cmd_check_config(args: argparse.Namespace, adapters: Mapping[str, type[Adapter]], out: TextIO) -> int:
    config = load(args.config, adapters)
    for warning in config.warnings:
        print(f"warning: {warning}", file=out)
    print(f"{config.path}: OK", file=out)
    redis_url = config.redis.url
    print(
        f"redis: {'configured URL' if redis_url else 'embedded, data in ' + str(embedded_for(config).data_dir)}",
        file=out,
    )
    print(f"accounts ({len(config.accounts)}):", file=out)
    for name, acct in config.accounts.items():
        # Never print values that may be secrets: only what identifies the account.
        adapter = adapters.get(acct.protocol)
        described = adapter.describe_account(acct) if adapter is not None else ""
        where = described or acct.get("Server") or acct.get("BindAddress") or acct.get("HomeServer") or ""
        print(f"  {name}  ({acct.protocol}{', ' + where if where else ''})", file=out)
    print(f"gateways ({len(config.gateways)}):", file=out)
    for gw in config.gateways:
        print(f"  {gw.name}:", file=out)
        for entry in gw.entries:
            print(f"    {entry.direction:5}  {entry.account}  {entry.channel}", file=out)
    from workers.feature_settings import FEATURE_SPECS

    for feature in FEATURE_SPECS:  # what each feature says of its settings (the personas), never a secret
        for line in feature.describe(config) if feature.describe is not None else ():
            print(line, file=out)
    return 0


async def _run(config: Config, adapters: Mapping[str, type[Adapter]], logstream: LogStream | None = None) -> int:
    from bridge.daemon import Daemon  # imports aiohttp & co only for the daemon
    from workers.registry import FEATURES  # and the workers' features (arq) only for it and the worker
    from workers.triggers import build_triggers

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # the job queue's own Redis first: a bad [workers] RedisURL stops us before the embedded Redis starts
    async with queue_redis_for(config) as queue, redis_for(config, start=True) as redis:
        # which inbound events start the workers' jobs; the daemon routes, the features decide
        triggers = build_triggers(
            config, redis, config.redis.key_prefix, logging.getLogger("talkbridge.workers"), FEATURES, queue
        )
        daemon = Daemon(config, redis, adapters, triggers=triggers, queue_redis=queue)
        logging.getLogger("talkbridge").info(
            "talkbridge %s: %d accounts, %d gateways", daemon.instance_id, len(config.accounts), len(config.gateways)
        )
        # Everything built so far lives as long as the process: keep it out of
        # the collector's scans, and collect young objects less often. Full
        # collections over the start-up heap were the relay's latency spikes.
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)
        sweeper = asyncio.create_task(collect_cycles(GC_FULL_EVERY), name="gc")
        if logstream is not None:  # WARN+ records to the fleet's log stream (the admin page's log view)
            logstream.start(redis, daemon.instance_id, daemon.metrics.registry)
        try:
            await daemon.run(stop)
        finally:
            sweeper.cancel()
            if logstream is not None:
                await logstream.aclose()  # before the embedded Redis stops
    return 0


@contextlib.asynccontextmanager
async def queue_redis_for(config: Config) -> AsyncIterator[Redis | None]:
    """The workers' job queue's own Redis (``[workers] RedisURL``: arq does
    not run on Redis Cluster, the bus may), closed on exit; None: the queue
    is on ``[redis] URL``'s, the bus's."""
    from workers.feature_settings import WorkersSection

    url = config.settings(WorkersSection).redis_url
    if not url:
        yield None
        return
    try:
        queue = connect(url)
    except RedisURLError as exc:  # a Sentinel address's shape; connect() names [redis] URL, never the value
        raise RedisURLError(str(exc).replace("redis.URL", "workers.RedisURL", 1)) from None
    try:
        yield queue
    finally:
        await queue.aclose()


async def collect_cycles(every: float) -> None:
    """A full collection every ``every`` seconds.

    httpx leaves each request/response pair in a reference cycle (~50
    objects and the message with them; found with gc.DEBUG_SAVEALL under the
    soak run). With the raised thresholds and CPython's rule that a full
    collection waits until a quarter of the old heap is new, those cycles
    waited minutes: one full collection in the soak's 10 minutes. The
    start-up heap is frozen, so a full collection scans only what was made
    since: milliseconds.
    """
    while True:
        await asyncio.sleep(every)
        gc.collect(2)


def raise_file_limit(log: logging.Logger) -> int | None:
    """Raise the soft limit on open files to the hard one, where allowed, and
    say so once; returns the soft limit now in force (None: no such limit).

    A service manager's usual soft limit, 1,024, is every socket and file
    the daemon may hold: a few hundred slow clients would exhaust it.
    """
    try:
        import resource
    except ImportError:  # no rlimits on this platform
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft == hard:
        log.info("file limit: %s open files (the soft limit is the hard one)", _limit(soft))
        return None if soft == resource.RLIM_INFINITY else soft
    # an unlimited hard limit may still be capped by the kernel (macOS: kern.maxfilesperproc)
    targets = [hard] if hard != resource.RLIM_INFINITY else [1 << 20, 65536, 10240]
    failure: Exception | None = None
    for target in (t for t in targets if t > soft):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            failure = exc
            continue
        log.info("file limit: raised the soft limit on open files from %d to %d (hard limit %s)", soft, target,
                 _limit(hard))  # fmt: skip
        return target
    if failure is not None:
        log.warning("file limit: could not raise %d open files towards %s: %s", soft, _limit(hard), failure)
    else:
        log.info("file limit: %d open files", soft)
    return soft


def _limit(value: int) -> str:
    try:
        import resource
    except ImportError:  # pragma: no cover
        return str(value)
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


def check_file_budget(config: Config, limit: int | None, log: logging.Logger) -> None:
    """Warn when the file limit is below what the listeners may hold at their cap."""
    if limit is None:
        return
    http = config.http
    listeners = (1 if http.bind_address else 0) + sum(1 for a in config.accounts.values() if a.get("BindAddress"))
    need = listeners * http.max_connections + FILES_RESERVED
    if listeners and limit < need:
        log.warning(
            "file limit: %d open files is less than %d listener(s) at [http] MaxConnections = %d need (about %d); "
            "beyond it new connections fail: raise the limit (systemd: LimitNOFILE=) or lower MaxConnections",
            limit, listeners, http.max_connections, need,
        )  # fmt: skip


def start_logging(config: Config) -> LogStream:
    """The console as configured, and WARN+ records queued for the fleet's log
    stream from now on (written once the process has its Redis), the config's
    warnings first."""
    setup_logging(config)
    logstream = install_log_stream(config.redis.key_prefix, config.accounts)
    log = logging.getLogger("talkbridge")
    for warning in config.warnings:
        log.warning("config: %s", warning)
    return logstream


def cmd_run(args: argparse.Namespace, adapters: Mapping[str, type[Adapter]], out: TextIO) -> int:
    config = load(args.config, adapters)
    logstream = start_logging(config)
    log = logging.getLogger("talkbridge")
    check_file_budget(config, raise_file_limit(log), log)
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(_run(config, adapters, logstream))


async def wait_for_daemon_redis(
    embedded: EmbeddedRedis, within: float, stop: asyncio.Event, log: logging.Logger
) -> bool | None:
    """Wait up to ``within`` seconds for the daemon's embedded server to answer.

    A script or a service manager starts the daemon and its workers together:
    a worker that wins the race waits for the daemon's Redis, as arq waits
    for a networked one, instead of dying. True: it answers; False: not
    within the bound; None: ``stop`` was set meanwhile.
    """
    if await asyncio.to_thread(embedded.attach):
        return True
    log.info(
        "waiting for the daemon's embedded Redis (%s): start `talkbridge run` with this config; "
        "giving up after %g s (--wait-for-redis)",
        embedded.socket_path, within,
    )  # fmt: skip
    started = time.monotonic()
    while (waited := time.monotonic() - started) < within:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), min(REDIS_POLL, within - waited))
        if stop.is_set():
            return None
        if await asyncio.to_thread(embedded.attach):
            log.info("the daemon's embedded Redis answers after %.1f s", time.monotonic() - started)
            return True
    return False


async def _worker(config: Config, logstream: LogStream | None = None, wait_for_redis: float = WAIT_FOR_REDIS) -> int:
    from workers.feature_settings import queue_redis_problem

    problem = queue_redis_problem(config)
    if problem is not None:
        print(f"talkbridge worker: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    # the job queue's own Redis first: a bad [workers] RedisURL stops us before any waiting
    async with queue_redis_for(config) as queue:
        return await _work(config, queue, logstream, wait_for_redis)


async def _work(config: Config, queue: Redis | None, logstream: LogStream | None, wait_for_redis: float) -> int:
    """Run jobs: arq's keys on ``queue`` (None: on the bus's Redis), the bus and everything else on [redis] URL's."""
    from workers.settings import run_worker, worker_id  # arq and the features only for the worker

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    url = config.redis.url
    if not url:
        # Workers share the daemon's embedded server; they never start one of
        # their own (a second server on the data directory would be a second bus).
        embedded = embedded_for(config)
        found = await wait_for_daemon_redis(embedded, wait_for_redis, stop, logging.getLogger("talkbridge.worker"))
        if found is None:  # stopped while waiting
            return 0
        if not found:
            print(
                f"talkbridge worker: no Redis after {wait_for_redis:g} s: start `talkbridge run` with this config "
                f"(embedded Redis in {embedded.data_dir}), or set [redis] URL",
                file=sys.stderr,
            )
            return EXIT_RUNTIME
        url = embedded.url
    redis = connect(url)
    instance = worker_id()
    if logstream is not None:  # a job's WARN+ records on the management page's log view, as a daemon's
        logstream.start(redis, instance)
    try:
        await run_worker(config, redis, stop, instance_id=instance, queue=queue)
    finally:
        if logstream is not None:
            await logstream.aclose()
        await redis.aclose()
    return 0


def cmd_worker(args: argparse.Namespace, adapters: Mapping[str, type[Adapter]], out: TextIO) -> int:
    config = load(args.config, adapters)
    logstream = start_logging(config)
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(_worker(config, logstream, args.wait_for_redis))


async def _status(config: Config, out: TextIO) -> int:
    async with redis_for(config, start=False) as redis:
        bus = bus_for(config, redis)
        accounts = await fleet.account_status(redis, bus, fleet.account_protocols(config))
        dlq = await redis.xlen(bus.dlq)
        redis_lines = describe(await read_record(redis, bus.prefix), await master_address(redis))
    for line in redis_lines:
        print(line, file=out)
    rows = [stream for account in accounts for stream in (account.inbound, account.outbound)]
    width = max([len(r["stream"]) for r in rows] + [6])
    print(f"{'stream':{width}}  {'length':>8}  {'lag':>8}  {'pending':>8}  {'oldest':>9}", file=out)
    for r in rows:
        oldest = f"{r['oldest_pending_s']:.1f}s" if r["pending"] else "-"
        print(f"{r['stream']:{width}}  {r['length']:>8}  {r['lag']:>8}  {r['pending']:>8}  {oldest:>9}", file=out)
    width = max([len(account.name) for account in accounts] + [7])
    print(f"{'account':{width}}  state", file=out)
    for account in accounts:
        state = f"owned by {account.owner}" if account.owner else "not owned"
        if account.degraded:
            state += f", degraded: {account.degraded}"
        if account.paused is not None:
            state += f", paused by {account.paused.get('by', '?')} (the admin page)"
        print(f"{account.name:{width}}  {state}", file=out)
    print(f"dead letters: {dlq}", file=out)
    return 0


def cmd_status(args: argparse.Namespace, adapters: Mapping[str, type[Adapter]], out: TextIO) -> int:
    return asyncio.run(_status(load(args.config, adapters), out))


async def _dlq(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    async with redis_for(config, start=False) as redis:
        bus = bus_for(config, redis)
        if args.action == "list":
            letters = await fleet.oldest_dead_letters(bus, args.limit)
            for letter in letters:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(letter.failed_at))
                print(f"{letter.id}  {when}Z  {letter.stream}  attempts={letter.attempts}  {letter.error}", file=out)
            print(f"{len(letters)} dead letter(s) shown", file=out)
            return 0
        bad = [one for one in args.ids if not fleet.valid_entry_id(one)]
        if bad:
            print(f"dlq {args.action}: not a dead letter id: {bad[0]!r}", file=sys.stderr)
            return EXIT_CONFIG
        if args.action == "discard":
            if not args.ids:
                print("dlq discard: name entry ids", file=sys.stderr)
                return EXIT_CONFIG
            gone = await fleet.discard(bus, args.ids)
            print(f"discarded {len(gone)} dead letter(s)", file=out)
            return 0
        if not args.all and not args.ids:
            print("dlq replay: name entry ids or pass --all", file=sys.stderr)
            return EXIT_CONFIG
        count = await fleet.replay(bus, None if args.all else args.ids)
        print(f"replayed {count} dead letter(s)", file=out)
        return 0


def cmd_dlq(args: argparse.Namespace, adapters: Mapping[str, type[Adapter]], out: TextIO) -> int:
    return asyncio.run(_dlq(load(args.config, adapters), args, out))


def cmd_adapter(args: argparse.Namespace, adapters: Mapping[str, type[Adapter]], out: TextIO) -> int:
    """A subcommand an adapter registered (``Adapter.cli_commands``)."""
    command: CliCommand = args.adapter_command
    return command.run(args, load(args.config, adapters), out)


def non_negative_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not 0 <= seconds < float("inf"):  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds: {value!r}")
    return seconds


def parser(adapters: Mapping[str, type[Adapter]]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="talkbridge", description="Bridge Nextcloud Talk, Matrix and Matterbridge rooms.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", "-c", required=True)
    worker = sub.add_parser("worker", help="run jobs (Instagram previews, persona replies) for the daemons")
    worker.add_argument("--config", "-c", required=True)
    worker.add_argument(
        "--wait-for-redis",
        type=non_negative_seconds,
        default=WAIT_FOR_REDIS,
        metavar="SECONDS",
        help=f"with the embedded Redis: how long to wait for the daemon's (default {WAIT_FOR_REDIS:g})",
    )
    check = sub.add_parser("check-config", help="validate a config and show what it sets up")
    check.add_argument("config")
    status = sub.add_parser("status", help="stream lengths, lag, pending and dead letters")
    status.add_argument("--config", "-c", required=True)
    dlq = sub.add_parser("dlq", help="inspect, re-drive or discard dead letters")
    dlq.add_argument("action", choices=["list", "replay", "discard"])
    dlq.add_argument("--config", "-c", required=True)
    dlq.add_argument("ids", nargs="*", help="dead-letter entry ids (replay, discard)")
    dlq.add_argument("--all", action="store_true", help="replay every dead letter")
    dlq.add_argument("--limit", type=int, default=100)
    for protocol, adapter in adapters.items():
        for command in adapter.cli_commands():
            if command.name in sub.choices:
                raise ValueError(f"{protocol}: the command {command.name!r} is already taken")
            extra = sub.add_parser(command.name, help=command.help)
            extra.add_argument("--config", "-c", required=True)
            command.add_arguments(extra)
            extra.set_defaults(adapter_command=command)
    return p


COMMANDS = {
    "run": cmd_run,
    "worker": cmd_worker,
    "check-config": cmd_check_config,
    "status": cmd_status,
    "dlq": cmd_dlq,
}


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout, adapters: Mapping[str, Any] | None = None) -> int:
    registry = adapters if adapters is not None else AdapterRegistry()
    args = parser(registry).parse_args(argv)
    try:
        return COMMANDS.get(args.command, cmd_adapter)(args, registry, out)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    except (EmbeddedRedisError, RedisURLError) as exc:
        print(f"talkbridge: {exc}", file=sys.stderr)
        return EXIT_CONFIG if isinstance(exc, RedisURLError) else EXIT_RUNTIME
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
