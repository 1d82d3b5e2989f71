// Live board updates: server-sent events read with fetch(), which can send the bearer token
// (EventSource cannot). Reconnects by itself; onChange(folder) is called for each change.
import { refresh, token } from "./api.js";

export function connectLive({ onChange, onState }) {
  let stopped = false;
  let controller = null;

  async function run() {
    let delay = 1000;
    let freshToken = false; // a 401 right after a refresh is not cured by another: back off instead
    while (!stopped) {
      controller = new AbortController();
      try {
        const response = await fetch("/app/events", {
          headers: { Authorization: `Bearer ${token()}`, Accept: "text/event-stream" },
          signal: controller.signal,
          credentials: "omit",
          cache: "no-store",
        });
        if (response.status === 401 && !freshToken) {
          await refresh();
          freshToken = true;
          continue;
        }
        freshToken = false;
        if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
        onState("live");
        delay = 1000;
        const reason = await read(response.body.getReader());
        if (reason === "reauthenticate") await refresh();
        else await new Promise((resolve) => setTimeout(resolve, 1000)); // ended by the server: reconnect calmly
      } catch (error) {
        if (stopped) return;
        onState("reconnecting");
        await new Promise((resolve) => setTimeout(resolve, delay));
        delay = Math.min(delay * 2, 15000);
      }
    }
  }

  async function read(reader) {
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return "closed";
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let event = "message";
        let data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) event = line.slice(6).trim();
          else if (line.startsWith("data:")) data += line.slice(5).trim();
        }
        if (event === "reauthenticate") return "reauthenticate";
        if (event === "board") {
          let folder = null;
          try { folder = JSON.parse(data).folder; } catch { folder = null; }
          onChange(folder);
        }
      }
    }
  }

  run();
  return () => { stopped = true; if (controller) controller.abort(); };
}
