// Idle sign-out: after `minutes` without activity the user is signed out, with a warning
// `warnSeconds` before. Timers are the page's own (tests can drive them with a fake clock).
const ACTIVITY = ["pointerdown", "keydown", "wheel", "touchstart", "scroll"];

export function watchIdle({ minutes, warnSeconds = 60, onWarn, onIdle }) {
  let warnTimer = null;
  let idleTimer = null;
  let warned = false;
  const total = Math.max(1, minutes) * 60 * 1000;
  const warnAt = Math.max(0, total - warnSeconds * 1000);

  function arm() {
    clearTimeout(warnTimer);
    clearTimeout(idleTimer);
    warned = false;
    warnTimer = setTimeout(() => { warned = true; onWarn(Math.round((total - warnAt) / 1000)); }, warnAt);
    idleTimer = setTimeout(() => { stop(); onIdle(); }, total);
  }
  // While the warning shows, only its own button (which calls reset) keeps the session.
  const activity = () => { if (!warned) arm(); };
  function stop() {
    clearTimeout(warnTimer);
    clearTimeout(idleTimer);
    ACTIVITY.forEach((name) => document.removeEventListener(name, activity, true));
  }
  ACTIVITY.forEach((name) => document.addEventListener(name, activity, { capture: true, passive: true }));
  arm();
  return { reset: arm, stop };
}
