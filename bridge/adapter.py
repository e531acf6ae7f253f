"""The one interface every protocol adapter implements, owned by the core.

The core (bridge/daemon.py, bridge/relay.py, the config loader) knows an
adapter only through this module; adapters import it, and the core imports
no adapter: the CLI, the composition root, hands the daemon the classes
(``adapters.AdapterRegistry``). Each account's adapter gets an
``AdapterContext``: everything it may use, passed in.

``Adapter``'s methods, each documented below:

- required: ``connect``, ``send``, ``disconnect``;
- optional, with a default that does nothing or the plain thing: ``join``
  (with the three, Matterbridge's ``Bridger``), ``receive`` (a poll or sync
  loop; none by default), ``send_batch`` (one ``send`` each by default),
  ``ingress_routes`` (stateless HTTP routes, served by every daemon
  instance: a Talk webhook can land on any of them), and the class methods
  ``check_account``, ``warn_account``, ``describe_account`` (config checks) and ``cli_commands``
  (``talkbridge`` subcommands).

Besides, ``protocol`` and ``options`` declare the config section and its
keys, and ``traits`` (an ``AdapterTraits``) says where an adapter departs
from the ordinary one. Inbound traffic is published through
``AdapterContext.publish``, or, by an adapter that keeps a receive cursor,
committed with that cursor through ``AdapterContext.commit_inbound``; the
core does everything else (routing, id mapping, retries, dead letters,
ordering). Everything but ingress runs only in the instance that holds the
account's lease.

The error types tell the core what a failed ``send`` means for the delivery;
``error_for_status`` maps an HTTP status to one (``retry_after_header`` reads its wait).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, TextIO

from bridge.bus import Write
from bridge.events import Delivery, Event
from bridge.health import AccountHealth
from bridge.idmap import Fenced
from bridge.keys import account_key
from bridge.options import Option  # declared in the config layer; adapters use it from here
from bridge.rejections import RejectionLog
from bridge.rooms import Rooms

if TYPE_CHECKING:
    import argparse

    from aiohttp import web
    from redis.asyncio import Redis

    from bridge.bus import Bus
    from bridge.config import AccountConfig, Config
    from bridge.idmap import Fence, IdMap
    from bridge.listener import ListenerLimits
    from bridge.metrics import Metrics


class DeliveryError(Exception):
    """Base for send failures; the subclass tells the core what to do next."""


class TransientError(DeliveryError):
    """Network trouble or a 5xx: retry with backoff, then dead-letter."""


class ServerUnavailable(TransientError):
    """The server takes no request now: down, restarting or in maintenance
    (connection refused, DNS, 502/503/504). Nothing is wrong with the
    delivery, so it does not spend its attempts: the core retries it with
    capped backoff for as long as the server is away (the room shows as
    failing, and is alerted after ``[alerts] FailedMinutes``), and an outage
    delays messages instead of dead-lettering them."""


class RateLimited(TransientError):
    """The server asked us to slow down (429)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(DeliveryError):
    """This delivery can never succeed (400, 404, 413): dead-letter it now."""


class AccountFailed(DeliveryError):
    """The account itself is unusable (401: wrong secret or revoked token).

    The core stops delivering for the account and raises an alert instead of
    retrying — a Nextcloud server locks out an IP after repeated 401s.
    """


UNAVAILABLE_STATUSES = frozenset({502, 503, 504})  # the server, or the one behind a proxy, is away


def retry_after_header(value: str | None) -> float | None:
    """A ``Retry-After`` header in seconds, for ``error_for_status``; None when
    absent or not a number (the HTTP-date form: no server we call sends it)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def error_for_status(status: int, what: str, retry_after: float | None = None) -> DeliveryError:
    """What an HTTP answer that is not a success means for the delivery, for
    any adapter over HTTP: 401 stops the account (retrying a refused credential
    only feeds the server's lockout), 429 waits ``retry_after`` (the server's
    ``Retry-After``, when it gave one), 502/503/504 wait for the server (a
    proxy before a server that is down, Nextcloud's maintenance mode), other
    5xx are retried, anything else cannot succeed. ``what`` names the request
    and the answer for the logs and the dead letter. An adapter that knows
    better for some status (Talk's 401 for a room the bot is not in) decides
    that one before calling this."""
    if status == 401:
        return AccountFailed(what)
    if status == 429:
        return RateLimited(what, retry_after)
    if status in UNAVAILABLE_STATUSES:
        return ServerUnavailable(what)
    if status >= 500:
        return TransientError(what)
    return PermanentError(what)


@dataclass(slots=True)
class AdapterContext:
    """Everything an adapter may use; passed in, never global."""

    account: AccountConfig
    publish: Callable[[Event], Awaitable[str]]  # durable: returns after XADD
    redis: Redis
    metrics: Metrics
    log: logging.Logger
    channels: Sequence[str] = field(default_factory=list)  # from the gateways
    # gateway name -> this account's channel in it, for gateways it sends into
    sends_into: Mapping[str, str] = field(default_factory=dict)
    key_prefix: str = "tb"
    max_body: int = 1 << 20  # [http] MaxBodyBytes
    http_limits: ListenerLimits | None = None  # [http] timeouts and cap for a listener of its own; None: defaults
    # The id map, whose fields also mark what was delivered; an adapter whose
    # send is a Redis write (the api buffer) records its deliveries there in
    # the same script, fenced by ``fence()`` (the lease token of the current
    # tenure): exactly once, and never alongside a successor.
    idmap: IdMap | None = None
    fence: Callable[[], Fence | None] = lambda: None
    # Refused requests (a forged webhook, a wrong token) are logged in summary
    # here, never one WARNING each: bridge/rejections.py. The daemon passes
    # its own, whose summaries it writes out as they fall due.
    rejections: RejectionLog = field(default_factory=lambda: RejectionLog(logging.getLogger("talkbridge.rejections")))
    bus: Bus | None = None  # for commit_inbound; None: a context that only publishes
    # What the adapter reports about its health (the calls below); built here when not passed.
    health: AccountHealth = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.health is None:
            self.health = AccountHealth(self.redis, self.key_prefix, self.account.name, self.metrics, self.log)

    # health: each call sets the gauges, the degraded mark (``talkbridge status``,
    # the management page) and what the alert watch reads, together (bridge/health.py)
    async def room_failed(self, room: str, reason: str, retry_in: float) -> None:
        """Receiving from (or posting to) ``room`` fails; tried again in ``retry_in`` seconds.
        Alerted once it has failed for ``[alerts] FailedMinutes``."""
        await self.health.room_failed(room, reason, retry_in)

    async def room_recovered(self, room: str) -> None:
        """``room`` works again, or the account left it (nothing if it was not failing)."""
        await self.health.room_recovered(room)

    async def receive_failed(self, reason: str, retry_in: float) -> None:
        """Receiving as a whole fails (the server away); shown as degraded."""
        await self.health.receive_failed(reason, retry_in)

    async def receive_recovered(self) -> None:
        await self.health.receive_recovered()

    async def credentials_refused(self, reason: str, retry_in: float | None = None) -> None:
        """The server refused the account's credentials: alerted (critical).
        ``retry_in``: the adapter probes again by itself that often; None when
        it raises ``AccountFailed`` and leaves the pause to the runner."""
        await self.health.credentials_refused(reason, retry_in)

    async def credentials_accepted(self) -> None:
        """The server accepts the credentials again (the alert clears once
        the account has worked: bridge/alerts_watch.py)."""
        await self.health.credentials_accepted()

    def key(self, *parts: str) -> str:
        """A Redis key private to this account, in its Cluster slot (bridge/keys.py):
        one script may write it with the account's streams and fence."""
        return account_key(self.key_prefix, self.account.name, *parts)

    async def commit_inbound(self, events: Sequence[Event], writes: Sequence[Write] = ()) -> list[str]:
        """Publish ``events`` together with the adapter's cursor ``writes``
        (keys named by ``key``), all or nothing, fenced by
        the lease token in the same script (``Bus.commit_inbound``): a stale
        owner gets ``Fenced`` and writes nothing. ``[bus] StreamMaxLen``
        applies and concurrent commits share round trips."""
        if self.bus is None:
            raise RuntimeError(f"{self.account.name}: this adapter context has no bus to commit to")
        return await self.bus.commit_inbound(self.account.name, events, writes, self.fence())

    async def check_fence(self) -> None:
        """Raise ``Fenced`` if another instance holds the account's lease now:
        for an adapter about to do something Redis cannot fence (an HTTP send
        after a long wait). A check, not a guarantee: the lease may change
        hands right after it."""
        fence = self.fence()
        if fence is not None:
            current = await self.redis.get(fence.key)
            if current is None or current.decode() != fence.token:
                raise Fenced(f"{self.account.name}: lease token {fence.token} is stale")

    @property
    def rooms(self) -> Rooms:
        """The rooms this account is in, for gateways whose channel is ``*``:
        an adapter whose rooms change at run time keeps it; the router reads it."""
        return Rooms(self.redis, self.key_prefix, self.account.name)


@dataclass(frozen=True, slots=True)
class CliCommand:
    """A ``talkbridge`` subcommand an adapter brings (``talk-bot-command``).

    The CLI adds ``--config/-c`` to it, loads and validates that config, then
    calls ``run(args, config, out)`` for an exit code; ``run`` raises
    ``bridge.config.ConfigError`` for a problem with the config or the
    arguments (printed, exit 2)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Config, TextIO], int]


@dataclass(frozen=True, slots=True)
class AdapterTraits:
    """Where an adapter departs from the ordinary one, read by the core. The
    defaults are the ordinary adapter (Talk, Matrix: one ``send`` per
    delivery, the core records it, each gateway entry names its channel);
    only the Matterbridge api (adapters/api/) sets any today."""

    batch_send: bool = False
    """Delivery loop (bridge/delivery.py): ``send_batch`` is all-or-nothing in
    one round trip, so the loop hands a lane's plain messages over together
    instead of one ``send`` each."""

    records_delivery: bool = False
    """Delivery loop: ``send`` itself records the delivery in ``ctx.idmap``
    atomically with it, checking the delivered-marker and the fence
    (``ctx.fence()``) in the same script (a Redis-backed network). The loop
    then neither looks the marker up, checks the fence before sending, nor
    records the copy: it only acknowledges."""

    fixed_channel: str | None = None
    """Config loader (bridge/config.py): the channel every gateway entry of
    this protocol has, whatever the entry says (which may then omit it):
    "api" for Matterbridge's api accounts (gateway.go mapChannelConfig).
    None: each entry names its channel."""

    relays_other_events: bool = False
    """Router (bridge/router.py, through the loader's ``ProtocolSpec``):
    ``send`` passes on events of ``EventKind.OTHER`` (an api client's
    topic_change or custom events, named in ``Event.event_name``), as
    Matterbridge's api bridge does; other adapters never get them."""


class Adapter(ABC):
    """One protocol. Nothing about an adapter is known to the core but what
    this class declares: no key names, no protocol names."""

    protocol: ClassVar[str]
    # Read by the config loader (bridge/config.py): the account keys accepted,
    # their types and defaults, and which are secrets (never printed).
    options: ClassVar[dict[str, Option]] = {}
    # Read by the delivery loop, the config loader and the router: see AdapterTraits.
    traits: ClassVar[AdapterTraits] = AdapterTraits()

    def __init__(self, ctx: AdapterContext) -> None:
        self.ctx = ctx

    @abstractmethod
    async def connect(self) -> None:
        """Open the connection (or listener). Raise on failure."""

    async def join(self, channel: str) -> None:  # noqa: B027 - optional
        """Start receiving from ``channel``; many protocols need nothing."""

    @abstractmethod
    async def send(self, delivery: Delivery) -> str | None:
        """Deliver one routed event; return the native id of what was posted.

        Must be safe to call again with the same ``delivery.key`` after a crash:
        use it as the network's idempotency key where there is one.
        """

    @abstractmethod
    async def disconnect(self) -> None:
        """Close everything ``connect`` opened."""

    async def receive(self) -> None:
        """Receive from the network for as long as the account is owned here
        (a long poll, a sync loop), publishing through ``ctx.publish``.

        Optional: an adapter whose traffic arrives only as webhooks does not
        override it. When overridden, the account runner (bridge/account_runner.py)
        starts it after ``connect`` and ``join``, beside the delivery loop, and
        supervises it: it should run for ever, so one that raises *or returns*
        is started again after a capped, jittered backoff, counted in
        ``talkbridge_receive_restarts``, and the account shows as degraded
        meanwhile. It is cancelled when the lease is lost and at shutdown:
        let ``CancelledError`` through. Raise ``AccountFailed`` on a refused
        credential (the runner then waits long before trying again)."""
        raise NotImplementedError(f"{type(self).__name__} has no receive loop")

    @classmethod
    def has_receive_loop(cls) -> bool:
        """Whether this adapter overrides ``receive`` (the runner checks)."""
        return cls.receive is not Adapter.receive

    async def send_batch(self, deliveries: Sequence[Delivery]) -> list[str | None]:
        """Deliver several in order; all or nothing (raise and none counts as sent).

        Only worth overriding when a batch is one round trip (the api buffer
        is one Redis script); the default sends one by one.
        """
        return [await self.send(d) for d in deliveries]

    def ingress_routes(self) -> list[web.RouteDef]:
        """Stateless HTTP routes for the shared server (webhooks)."""
        return []

    @classmethod
    def check_account(cls, account: AccountConfig) -> list[str]:
        """Extra validation beyond the option types; return problems."""
        return []

    @classmethod
    def warn_account(cls, account: AccountConfig) -> list[str]:
        """Settings that load but deserve a warning (an open door, say); return them."""
        return []

    @classmethod
    def describe_account(cls, account: AccountConfig) -> str:
        """What ``talkbridge check-config`` says the account connects to, as
        understood from its keys (never a secret); "": the URL it names."""
        return ""

    @classmethod
    def cli_commands(cls) -> Sequence[CliCommand]:
        """Subcommands of ``talkbridge`` this protocol adds (bridge/cli.py builds them)."""
        return ()
