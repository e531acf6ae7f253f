"""A client of a running Matterbridge: ``[matterbridge.NAME]`` connects to one
of its ``[api.x]`` accounts, so every network Matterbridge speaks (Slack,
Discord, Telegram, IRC, XMPP, Mattermost, WhatsApp…) reaches talkbridge's
rooms through it. docs/matterbridge-client.md is the user's page.

A channel of a ``[[gateway.inout]]`` entry of this account is the name of a
*Matterbridge* gateway the api account sits in; one api account can sit in
several. The reference is Matterbridge 1.26 (42wim/matterbridge,
bridge/api/api.go and gateway/gateway.go at e68ddcf5).

Receiving (receiving.py): the websocket with the stream beside it (1.26's
ring is handed over only by the stream: ``/api/messages`` shrinks it to 10),
else the stream, else polling; every message handed over is recognised by
its digest, so what arrived while talkbridge was away (or killed) is relayed
once and in order before what arrives live. Messages of gateways not
bridged here are dropped, and so is our own post if Matterbridge's config
echoes it back (it carries the installation's mark in ``Extra.talkbridge``).

Sending (adapter.py): ``POST /api/message`` with the gateway, nick, avatar,
``parent_id`` where the reply's target has a copy there, files as
``Extra.file``. Matterbridge answers 200 with no id, and its api cannot edit,
delete or react: ``EditFormat``, ``ReactionFormat``, ``DeleteFormat`` say what
is posted instead (an edit as "{TEXT} (edited)" by default; reactions and
deletions dropped). A Matterbridge that is down is away (``ServerUnavailable``):
deliveries wait for it, none is dead-lettered for it.

Limits, all Matterbridge's: its ring is in memory (a Matterbridge restart
loses what it held) and holds ``Buffer`` messages (10 by default: more
arrive while talkbridge is away and the oldest are overwritten); its stream
hands a message over without acknowledgement and at most 10 a second; its api
gives no ids, so replies towards it arrive as "msg-parent-not-found" on the
other networks and edits as new messages; a post has no idempotency key, so
a daemon killed between Matterbridge's 200 and the record posts once more.
"""

from adapters.matterbridge.adapter import MatterbridgeClient

__all__ = ["MatterbridgeClient"]
