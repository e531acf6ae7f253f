// talkbridge admin: live updates over server-sent events, and confirmations.
// Plain script, no build step; every form also works without it.
"use strict";

function confirmations(root) {
  root.addEventListener("submit", (event) => {
    const submitter = event.submitter;
    const form = event.target;
    const text = (submitter && submitter.dataset.confirm) || form.dataset.confirm;
    if (text && !window.confirm(text)) {
      event.preventDefault();
    }
  });
  root.addEventListener("change", (event) => {
    if (event.target.classList.contains("select-all")) {
      const form = event.target.closest("form");
      for (const box of form.querySelectorAll('input[type="checkbox"][name="id"]')) {
        box.checked = event.target.checked;
      }
    }
  });
}

function live() {
  const root = document.getElementById("live");
  if (!root || !window.EventSource) {
    return;
  }
  const state = document.getElementById("live-state");
  const show = (text, cls) => {
    if (state) {
      state.textContent = text;
      state.className = "live-state " + cls;
    }
  };
  const source = new EventSource(root.dataset.events);
  source.addEventListener("open", () => show("live", "on"));
  source.addEventListener("error", () => show("reconnecting…", "off"));
  source.addEventListener("logout", () => {
    source.close();
    window.location.assign("/login");
  });
  source.addEventListener("snapshot", (event) => {
    const parts = JSON.parse(event.data);
    for (const [id, html] of Object.entries(parts)) {
      const target = document.getElementById(id);
      // server-rendered with autoescaping, from this origin only
      if (target && target.innerHTML !== html) {
        target.innerHTML = html;
      }
    }
    const updated = document.getElementById("updated");
    if (updated) {
      updated.textContent = new Date().toISOString().replace("T", " ").slice(0, 19) + "Z";
    }
    root.dataset.updates = String(Number(root.dataset.updates || "0") + 1);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  confirmations(document);
  live();
});
