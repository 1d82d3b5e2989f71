// Idle sign-out: after `minutes` without activity the user is signed out, with a warning
// `warnSeconds` before. Timers are the page's own (tests can drive them with a fake clock).
// Signing out ends the session every tab shares, so activity in any tab of the page counts for
// all of them: each tells the others through a BroadcastChannel (no storage, nothing but "active").
// The server keeps its own idle clock (directory ends a session idle past the agency's limit even
// if no page is left to sign it out), so activity is also reported to it through `report`: at most
// once every REPORT_EVERY_MS, and the last activity of a quiet spell is reported when that spell
// ends, so the server's clock never runs ahead of the page's. Only the user's own input counts
// (keyboard, pointer, touch, wheel, the page shown again); scrolling, timers, polling and the live
// event stream do not.
const ACTIVITY = ["pointerdown", "keydown", "wheel", "touchstart"];
const CHANNEL = "clinic-board-activity";
const SHARE_EVERY_MS = 5000;
export const REPORT_EVERY_MS = 30000;

export function watchIdle({ minutes, warnSeconds = 60, onWarn, onIdle, onActiveElsewhere, report }) {
  let warnTimer = null;
  let idleTimer = null;
  let reportTimer = null;
  let warned = false;
  let sharedAt = -Infinity;
  let reportedAt = -Infinity;
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
  function sendReport() {
    reportTimer = null;
    reportedAt = Date.now();
    if (report) report();
  }
  // At once when the last report is old enough (or `now`), else once when it is: never more often.
  function reportSoon(now = false) {
    if (!report) return;
    const wait = reportedAt + REPORT_EVERY_MS - Date.now();
    if (now || wait <= 0) {
      clearTimeout(reportTimer);
      sendReport();
    } else if (!reportTimer) {
      reportTimer = setTimeout(sendReport, wait);
    }
  }
  // While the warning shows, only its own button (which calls reset) keeps the session here.
  // Events a script dispatched (isTrusted false) are not the user's.
  const activity = (event) => {
    if (warned || (event && event.isTrusted === false)) return;
    arm();
    share();
    reportSoon();
  };
  const shown = (event) => { if (document.visibilityState === "visible") activity(event); };
  if (channel) {
    channel.onmessage = () => {
      arm();
      if (onActiveElsewhere) onActiveElsewhere();
    };
  }
  function stop() {
    clearTimeout(warnTimer);
    clearTimeout(idleTimer);
    clearTimeout(reportTimer);
    reportTimer = null;
    ACTIVITY.forEach((name) => document.removeEventListener(name, activity, true));
    document.removeEventListener("visibilitychange", shown);
    if (channel) channel.close();
  }
  ACTIVITY.forEach((name) => document.addEventListener(name, activity, { capture: true, passive: true }));
  document.addEventListener("visibilitychange", shown);
  arm();
  reportSoon(true); // the page was just opened or signed into: the user is here
  return { reset: () => { arm(); share(); reportSoon(true); }, stop };
}
