"""Matterbridge's ``api`` protocol: ``[api.NAME]`` with ``BindAddress``,
``Token``, ``Buffer``, compatible with Matterbridge's HTTP API.

- ``GET /api/health``   -> ``OK``
- ``GET /api/messages`` -> JSON array of buffered messages; drains the buffer
- ``GET /api/stream``   -> one JSON object per line, first ``{"event":"api_connected"}``
- ``POST /api/message`` -> publish a message into its gateway
- ``GET /api/websocket`` -> both ways over a WebSocket (``websocket`` below)

Where Matterbridge fails its users we do better: the buffer is a Redis stream
(it survives restarts); a POST naming an unknown gateway gets 400 with the
reason instead of a silent 200; edits (``id`` of an earlier message, as the
POST answer gave it), deletions (``event: "msg_delete"``), replies
(``parent_id``) and reactions (``event: "reaction_add"`` /
``"reaction_remove"``, emoji in ``text``, target in ``parent_id``) are carried.
Outbound, a message whose ``id`` a client has seen before replaces it.

Otherwise a POST is read as Matterbridge's (bridge/api/api.go
``handlePostMessage``, Go's encoding/json into config.Message): keys match
without regard to case, the channel is always ``api``, and an event we have
no kind for (``topic_change``, ``user_typing``, a client's own) is accepted
and routed as Matterbridge routes it (bridge/router.py).

**Readers share the buffer; none can hold it.** Every reader
(``/api/messages``, ``/api/stream``, ``/api/websocket``) takes the oldest
rows no other reader holds: it *claims* a page (a Redis read and a note in
this process, under a lock held for that read only), writes it to its client
outside any lock, and only then deletes it from Redis. A page counts as
written once the connection's socket has taken all of it (the transport's
buffer is empty). A client that takes nothing of it for
``WriteTimeoutSeconds`` is disconnected (within twice that time; a slow one
that keeps taking keeps its connection), and its page, like that of a
client gone meanwhile, goes back to the buffer, where it never left:
released, the rows are again the oldest unclaimed ones, and the next reader
takes them. So nothing
is lost and nothing is taken by two readers; each reader gets the rows in
the buffer's order, except that rows let go by a reader that stalled reach
the next reader after what it took meanwhile (a live reader does not wait
for a stalled one). What a connection's socket has taken counts as
delivered: bytes a client never read from its kernel's buffers are lost
with it, as with any TCP server. ``/api/messages`` answers with a
``Content-Length``: a cut-off answer is an incomplete one, and its rows stay.

**Per-client limits.** One client address (an IPv6 one by its /64) keeps
at most ``MaxStreamsPerClient`` ``/api/stream`` and ``/api/websocket``
connections open; more are answered ``429``. Behind a reverse proxy every
client has the proxy's address: raise the limit (0: none) there.
"""

from adapters.api.adapter import MatterbridgeAPI

__all__ = ["MatterbridgeAPI"]
