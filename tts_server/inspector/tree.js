// Draws a search tree as SVG: one column per iteration, leaves stacked top to bottom in the
// order the search made them, each parent centred on its children. Edges carry the PRM score of
// the step they lead to; pruned branches are grey; the selected path is drawn thick.

const SVG = "http://www.w3.org/2000/svg";
const COLUMN = 150;
const ROW = 24;
const MARGIN = 24;

function el(name, attrs = {}, text = null) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== null) node.textContent = text;
  return node;
}

const score = (s) => (s === null || s === undefined ? "" : Number(s).toFixed(2));

// nodes: an array of {id, parent, iteration, status, score, answer, candidate?, text?}.
// selected: the node ids of the selected path (empty while the search runs).
export function drawTree(svg, nodes, selected = []) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const byId = new Map(nodes.map((n) => [n.id, n]));
  if (!byId.has(0)) byId.set(0, { id: 0, parent: null, iteration: 0, status: "kept" });
  const kids = new Map();
  for (const n of byId.values()) {
    if (n.parent === null || n.parent === undefined) continue;
    if (!byId.has(n.parent)) continue; // left out by the size bound: not drawn
    if (!kids.has(n.parent)) kids.set(n.parent, []);
    kids.get(n.parent).push(n.id);
  }
  for (const list of kids.values()) list.sort((a, b) => a - b);

  // y: leaves in depth-first order; a parent at the middle of its children.
  const y = new Map();
  let next = 0;
  const place = (id) => {
    const children = kids.get(id) || [];
    if (!children.length) { y.set(id, next++); return; }
    children.forEach(place);
    const ys = children.map((c) => y.get(c));
    y.set(id, (Math.min(...ys) + Math.max(...ys)) / 2);
  };
  place(0);
  const depth = Math.max(0, ...[...byId.values()].map((n) => n.iteration || 0));
  const px = (id) => MARGIN + (byId.get(id).iteration || 0) * COLUMN;
  const py = (id) => MARGIN + y.get(id) * ROW;
  svg.setAttribute("width", MARGIN * 2 + depth * COLUMN + 220);
  svg.setAttribute("height", MARGIN * 2 + Math.max(1, next) * ROW);

  const onPath = new Set(selected);
  const edges = el("g", { class: "edges" });
  const labels = el("g", { class: "edge-labels" });
  for (const [parent, children] of kids) {
    for (const id of children) {
      const n = byId.get(id);
      const chosen = onPath.has(id) && onPath.has(parent);
      const cls = `edge ${n.status === "pruned" ? "pruned" : ""} ${chosen ? "chosen" : ""}`;
      const [x1, y1, x2, y2] = [px(parent), py(parent), px(id), py(id)];
      const mid = (x1 + x2) / 2;
      edges.appendChild(el("path", { class: cls, d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}`, "data-to": id }));
      if (n.score !== null && n.score !== undefined) {
        const label = el("text", { class: `edge-label ${n.status === "pruned" ? "pruned" : ""}`, x: x2 - 34, y: y2 - 4 }, score(n.score));
        labels.appendChild(label);
      }
    }
  }
  svg.appendChild(edges);
  svg.appendChild(labels);

  const chosenLeaf = selected.length ? selected[selected.length - 1] : null;
  const dots = el("g", { class: "nodes" });
  for (const n of byId.values()) {
    if (!y.has(n.id)) continue;
    const isCandidate = n.candidate !== null && n.candidate !== undefined;
    const classes = ["node", `status-${n.status}`];
    if (n.id === 0) classes.push("root");
    if (isCandidate) classes.push("candidate");
    if (n.id === chosenLeaf) classes.push("chosen");
    const g = el("g", { class: classes.join(" "), "data-id": n.id, transform: `translate(${px(n.id)},${py(n.id)})` });
    if (isCandidate) g.setAttribute("data-candidate", n.candidate);
    if (n.answer !== null && n.answer !== undefined) g.setAttribute("data-answer", n.answer);
    g.appendChild(el("circle", { r: n.id === 0 ? 7 : 5 }));
    const tip = n.id === 0 ? "the prompt" : `#${n.id} ${n.status} score ${score(n.score)}\n${n.text || ""}`;
    g.appendChild(el("title", {}, tip));
    if (n.id === 0) g.appendChild(el("text", { x: -4, y: -10 }, "prompt"));
    if (n.answer !== null && n.answer !== undefined && n.status !== "kept") {
      const mark = n.id === chosenLeaf ? "★ " : "";
      g.appendChild(el("text", { x: 10, y: 4 }, `${mark}${n.answer}${isCandidate ? `  (#${n.candidate})` : ""}`));
    }
    dots.appendChild(g);
  }
  svg.appendChild(dots);
  return { leaves: next };
}
