// The JSON API from the browser: the key from localStorage as a Bearer header, the error
// envelope as ApiError, paging, the events stream (fetch + a small SSE parser, because
// EventSource cannot send an Authorization header) and authenticated downloads.

const KEY_ITEM = "distill.apiKey";

export const getKey = () => localStorage.getItem(KEY_ITEM) || "";

export function setKey(key) {
  if (key) localStorage.setItem(KEY_ITEM, key);
  else localStorage.removeItem(KEY_ITEM);
}

export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `the server answered HTTP ${status}`);
    this.status = status;
    this.code = error.code || "error";
    this.details = error.details || {};
  }
}

function withKey(headers = {}) {
  const key = getKey();
  return key ? { ...headers, Authorization: `Bearer ${key}` } : { ...headers };
}

async function failure(response) {
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json().catch(() => null) : null;
  const error = new ApiError(response.status, body);
  if (response.status === 401) {
    window.dispatchEvent(new CustomEvent("distill:unauthorized", { detail: error.message }));
  }
  return error;
}

/** A JSON request; `json` is sent as the body, `form` (FormData) as multipart. */
export async function api(path, { method = "GET", json, form, signal } = {}) {
  const init = { method, headers: withKey({ Accept: "application/json" }), signal };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (form) {
    init.body = form;
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await failure(response);
  return response.json();
}

/** Every item of a list endpoint (newest first), following the `after` cursor. */
export async function listAll(path, maxPages = 20) {
  const items = [];
  let after = "";
  for (let i = 0; i < maxPages; i++) {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api(`${path}${sep}limit=100${after ? `&after=${after}` : ""}`);
    items.push(...page.data);
    if (!page.has_more || !page.data.length) break;
    after = page.data[page.data.length - 1].id;
  }
  return items;
}

/** A job's events so far, oldest first. */
export async function eventHistory(jobId, signal) {
  const events = [];
  for (;;) {
    const after = events.length ? events[events.length - 1].seq : 0;
    const page = await api(`/v1/jobs/${jobId}/events?after=${after}&limit=1000`, { signal });
    events.push(...page.data);
    if (!page.has_more || !page.data.length) return events;
  }
}

function parseBlock(block) {
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  return data.length ? JSON.parse(data.join("\n")) : null; // comments and retry: nothing
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Live events after `after`, one `onEvent(event)` each, until the server ends the stream (the
 * job finished) or `signal` aborts. A dropped connection is resumed from the last seq.
 */
export async function streamEvents(jobId, after, onEvent, signal) {
  let last = after;
  for (;;) {
    try {
      const response = await fetch(`/v1/jobs/${jobId}/events?after=${last}`, {
        headers: withKey({ Accept: "text/event-stream" }),
        signal,
      });
      if (!response.ok) throw await failure(response);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return; // the server closes the stream after the final status
        buffer += value.replace(/\r/g, "");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = parseBlock(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (event) {
            last = event.seq;
            onEvent(event);
          }
        }
      }
    } catch (error) {
      if (signal && signal.aborted) return;
      if (error instanceof ApiError && error.status < 500) throw error;
    }
    await sleep(2000);
  }
}

/** Download an artifact with the key, then hand the bytes to the browser as a file. */
export async function download(artifact) {
  const response = await fetch(`/v1/artifacts/${artifact.id}/content`, { headers: withKey() });
  if (!response.ok) throw await failure(response);
  const url = URL.createObjectURL(await response.blob());
  const link = document.createElement("a");
  link.href = url;
  link.download = artifact.name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}
