"""Nextcloud Talk: what every Talk adapter shares (``adapters.talk.common``)."""
