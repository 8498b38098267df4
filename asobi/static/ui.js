// Small DOM helpers shared by the playground and the console.  Everything a game or a player
// controls (state values, player ids, log text) goes into the page through textContent only.

/** Create an element; string children become text nodes (never parsed as HTML). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

export function $(id) {
  return document.getElementById(id);
}

/** Flatten a JSON value into path -> leaf value ("players.alice.x" -> 3). */
export function flatten(value, prefix = "", out = new Map()) {
  if (value !== null && typeof value === "object") {
    const entries = Array.isArray(value) ? value.map((v, i) => [String(i), v]) : Object.entries(value);
    if (entries.length === 0) out.set(prefix, Array.isArray(value) ? "[]" : "{}");
    for (const [key, child] of entries) flatten(child, prefix ? `${prefix}.${key}` : key, out);
  } else {
    out.set(prefix, value);
  }
  return out;
}

/** A JSON value as a nested list; leaves whose path is in `changed` get the class "changed". */
export function tree(value, changed = new Set(), prefix = "") {
  if (value === null || typeof value !== "object") {
    return el("span", { class: `leaf ${typeof value}${changed.has(prefix) ? " changed" : ""}`, text: JSON.stringify(value) ?? "undefined" });
  }
  const entries = Array.isArray(value) ? value.map((v, i) => [String(i), v]) : Object.entries(value);
  if (entries.length === 0) return el("span", { class: "leaf", text: Array.isArray(value) ? "[]" : "{}" });
  const list = el("ul", { class: "tree" });
  for (const [key, child] of entries) {
    const path = prefix ? `${prefix}.${key}` : key;
    list.append(el("li", {}, el("span", { class: "key", text: key }), ": ", tree(child, changed, path)));
  }
  return list;
}

/** Draw `values` as a line on a small canvas. */
export function sparkline(canvas, values) {
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  ctx.clearRect(0, 0, width, height);
  if (values.length < 2) return;
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (hi === lo) {
    hi += 1;
    lo -= 1;
  }
  ctx.strokeStyle = "#2b7de9";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  values.forEach((v, i) => {
    const x = (i / (values.length - 1)) * (width - 2) + 1;
    const y = height - 1 - ((v - lo) / (hi - lo)) * (height - 2);
    if (i === 0) ctx.moveTo(x, y);
    else ctx.lineTo(x, y);
  });
  ctx.stroke();
}

export function bytes(n) {
  if (n === null || n === undefined) return "-";
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}
