// The page's side of a shared, persistent server (docs/app.md): the API key, asked once and
// sent as a bearer token; the session id in the page's URL, so a reload resumes the session.
const KEY = "safeclick-api-key";

export function authHeaders() {
  const k = localStorage.getItem(KEY);
  return k ? { authorization: `Bearer ${k}` } : {};
}

// after a 401: ask for the key (the server's sentence says why); false when the user cancels
export function askKey(why) {
  const k = window.prompt(`${why}\n\nThis server needs its API key:`);
  if (k === null) return false;
  localStorage.setItem(KEY, k.trim());
  return true;
}

export function sessionInUrl() {
  return new URLSearchParams(location.search).get("session");
}

export function putSessionInUrl(id) {
  const u = new URL(location.href);
  u.searchParams.set("session", id);
  u.searchParams.delete("open");
  history.replaceState(null, "", u);
}

// server-sent events read with fetch (EventSource cannot send the key): onData(object) per event
export async function readEvents(path, onData, signal) {
  const r = await fetch(path, { headers: authHeaders(), signal });
  if (!r.ok || !r.body) return;
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 2);
      if (line.startsWith("data: ")) onData(JSON.parse(line.slice(6)));
    }
  }
}

// a download that carries the key: fetched, then saved from memory
export async function download(path, name) {
  const r = await fetch(path, { headers: authHeaders() });
  if (!r.ok) throw new Error((await r.json().catch(() => ({}))).detail || `${r.status} ${r.statusText}`);
  const a = document.createElement("a");
  a.href = URL.createObjectURL(await r.blob());
  a.download = name;
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}
