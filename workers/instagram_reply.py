"""What a room is told: a preview's text, and the short messages (queued,
paused, private, gone...). Plain text, the same on every network; links
stay bare so every client makes them clickable."""

from __future__ import annotations

from dataclasses import dataclass

from workers.instagram_fetch import ErrorKind, Preview
from workers.instagram_urls import Target
from workers.ratelimit import seconds_text

MAX_CAPTION = 700  # characters of a caption or bio in a preview; the link has the rest
ICONS = {"post": "📷", "reel": "🎬", "tv": "📺", "profile": "👤"}
NOUNS = {"post": "Post", "reel": "Reel", "tv": "Video", "profile": "Profile"}


@dataclass(slots=True)
class File:
    """A downloaded media file, ready to upload."""

    name: str
    mime: str
    data: bytes


def _count(n: int) -> str:
    if n >= 10_000_000:
        return f"{n / 1_000_000:.0f}M"
    if n >= 1_000_000:
        return f"{n / 1_000_000:.1f}M".replace(".0M", "M")
    if n >= 10_000:
        return f"{n / 1000:.0f}k"
    return f"{n:,}"


def _duration(seconds: float) -> str:
    total = round(seconds)
    return (
        f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"
        if total >= 3600
        else f"{total // 60}:{total % 60:02d}"
    )


def _clip(text: str, limit: int = MAX_CAPTION) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def render(preview: Preview, *, media_links: bool, notes: list[str] | tuple[str, ...] = ()) -> str:
    """The preview's text. ``media_links``: the room cannot take files, so
    each image or video is a link (Instagram's CDN links are signed and
    expire after some days; the post's own link stays)."""
    who = f"@{preview.author}" if preview.author else "Instagram"
    if preview.author_name and preview.author_name != preview.author:
        who += f" ({preview.author_name})"
    if preview.kind == "profile":
        head = f"{ICONS['profile']} {who}"
        if preview.private:
            head += " · private account"
    else:
        head = f"{ICONS.get(preview.kind, '📷')} {NOUNS.get(preview.kind, 'Post')} by {who}"
    lines = [head]
    if preview.caption:
        lines.append(_clip(preview.caption))
    stats = []
    if preview.kind == "profile":
        for value, label in (
            (preview.followers, "followers"),
            (preview.following, "following"),
            (preview.posts, "posts"),
        ):
            if value is not None:
                stats.append(f"{_count(value)} {label}")
    else:
        if preview.likes is not None:
            stats.append(f"❤️ {_count(preview.likes)}")
        if preview.comments is not None:
            stats.append(f"💬 {_count(preview.comments)}")
        if preview.duration:
            stats.append(f"⏱ {_duration(preview.duration)}")
        if len(preview.media) > 1:
            stats.append(f"{len(preview.media)} items")
    if stats:
        lines.append(" · ".join(stats))
    for code, caption in preview.recent:
        line = f"https://www.instagram.com/p/{code}/"
        lines.append(f"• {line} {_clip(caption, 80)}".rstrip())
    if media_links:
        many = len(preview.media) > 1
        for i, media in enumerate(preview.media, start=1):
            label = ("Video" if media.kind == "video" else "Image") + (f" {i}" if many else "")
            lines.append(f"{label}: {media.url}")
    lines.extend(notes)
    lines.append(preview.link)
    return "\n".join(lines)


def error_text(kind: ErrorKind | str, target: Target) -> str:
    what = "profile" if target.kind == "profile" else "post"
    if kind == "private":
        return f"🔒 This Instagram {what} is private: no preview."
    if kind == "not_found":
        return f"This Instagram {what} is not available (deleted, or never public)."
    if kind == "restricted":
        return "This Instagram post is restricted (age or region): no preview without a logged-in account."
    if kind == "unsupported":
        if target.kind == "story":
            return "Instagram stories cannot be previewed."
        return f"Nothing to preview in this Instagram {what}."
    if kind in ("rate_limited", "login_required"):
        return "Instagram kept refusing us for too long: no preview for this link, sorry. Try again later."
    return "Could not fetch this Instagram link right now. Try again later."


def queued_text(wait: float) -> str:
    return f"⏳ Instagram preview queued (rate limit): about {seconds_text(wait)}."


def paused_text(wait: float) -> str:
    return f"⏳ Instagram is limiting us right now, previews are paused: this one in about {seconds_text(wait)}."
