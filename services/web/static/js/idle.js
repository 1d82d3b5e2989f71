// Idle sign-out: after `minutes` without activity the user is signed out, with a warning
// `warnSeconds` before. Timers are the page's own (tests can drive them with a fake clock).
// Signing out ends the session every tab shares, so activity in any tab of the page counts for
// all of them: each tells the others through a BroadcastChannel (no storage, nothing but "active").
const ACTIVITY = ["pointerdown", "keydown", "wheel", "touchstart", "scroll"];
const CHANNEL = "clinic-board-activity";
const SHARE_EVERY_MS = 5000;

export function watchIdle({ minutes, warnSeconds = 60, onWarn, onIdle, onActiveElsewhere }) {
  let warnTimer = null;
  let idleTimer = null;
  let warned = false;
  let sharedAt = -Infinity;
  const total = Math.max(1, minutes) * 60 * 1000;
  const warnAt = Math.max(0, total - warnSeconds * 1000);
  const channel = typeof BroadcastChannel === "function" ? new BroadcastChannel(CHANNEL) : null;

  function arm() {
    clearTimeout(warnTimer);
    clearTimeout(idleTimer);
    warned = false;
    warnTimer = setTimeout(() => { warned = true; onWarn(Math.round((total - warnAt) / 1000)); }, warnAt);
    idleTimer = setTimeout(() => { stop(); onIdle(); }, total);
  }
  function share() {
    const now = Date.now();
    if (channel && now - sharedAt >= SHARE_EVERY_MS) {
      sharedAt = now;
      channel.postMessage("active");
    }
  }
  // While the warning shows, only its own button (which calls reset) keeps the session here.
  const activity = () => { if (!warned) { arm(); share(); } };
  if (channel) {
    channel.onmessage = () => {
      arm();
      if (onActiveElsewhere) onActiveElsewhere();
    };
  }
  function stop() {
    clearTimeout(warnTimer);
    clearTimeout(idleTimer);
    ACTIVITY.forEach((name) => document.removeEventListener(name, activity, true));
    if (channel) channel.close();
  }
  ACTIVITY.forEach((name) => document.addEventListener(name, activity, { capture: true, passive: true }));
  arm();
  return { reset: () => { arm(); share(); }, stop };
}
