// The tables under the tree: the vote's answer groups, what each stage cost, the tree per
// iteration, and the candidates (the flat sample list of best-of-N, majority, ...).

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "–" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
}

function table(caption, head, rows, id) {
  const t = document.createElement("table");
  t.id = id;
  const c = document.createElement("caption");
  c.textContent = caption;
  t.appendChild(c);
  const h = document.createElement("tr");
  for (const name of head) {
    const th = document.createElement("th");
    th.textContent = name;
    h.appendChild(th);
  }
  t.appendChild(h);
  for (const { cells, selected, classes } of rows) {
    const tr = document.createElement("tr");
    if (selected) tr.className = "selected";
    cells.forEach((v, i) => cell(tr, v, classes ? classes[i] : null));
    t.appendChild(tr);
  }
  return t;
}

const num = (v, digits = 3) => (v === null || v === undefined ? null : Number(v).toFixed(digits));
const big = (v) => (v === null || v === undefined ? null : Number(v).toExponential(2));

export function summary(box, id, trace) {
  box.textContent = "";
  const answer = document.createElement("div");
  answer.className = "answer";
  answer.id = "answer";
  answer.textContent = `answer: ${trace.answer ?? "(none)"}`;
  box.appendChild(answer);
  const line = document.createElement("div");
  const agreement = trace.agreement === null ? "–" : `${Math.round(trace.agreement * 100)}%`;
  line.textContent = `${id}: ${trace.strategy} (asked: ${trace.requested_strategy}), budget ${trace.budget}, ` +
    `beam width ${trace.beam_width}, ${trace.candidates.length} candidates, agreement ${agreement}, ` +
    `${trace.iterations} iterations, ${trace.wall_time_s} s` + (trace.partial ? ", partial (deadline)" : "") +
    (trace.truncated.any ? `, truncated (${trace.truncated.nodes_omitted} nodes left out, ${trace.truncated.texts_cut} texts cut)` : "");
  line.id = "request-line";
  box.appendChild(line);
}

export function tables(box, trace) {
  box.textContent = "";
  box.appendChild(table(
    "Answer groups of the vote",
    ["answer", "weight", "candidates"],
    trace.groups.map((g) => ({ cells: [g.answer, num(g.weight), g.candidates.map((i) => `#${i}`).join(" ")], selected: g.selected })),
    "groups",
  ));
  const s = trace.stages;
  // Tokens read (the policy's prompts, the PRM's inputs) and generated, and the FLOPs of each.
  const rows = [
    { cells: ["generation (policy)", num(s.generation.seconds), s.generation.calls, s.generation.prompt_tokens, s.generation.completion_tokens, s.generation.cached_tokens, big(s.generation.flops)] },
    { cells: ["prm_scoring (PRM)", num(s.prm_scoring.seconds), s.prm_scoring.calls, s.prm_scoring.tokens, null, null, big(s.prm_scoring.flops)] },
    { cells: ["selection", num(s.selection.seconds), null, null, null, null, null] },
  ];
  if (s.pilot) rows.unshift({ cells: ["pilot (auto)", num(s.pilot.seconds), null, null, null, null, null] });
  box.appendChild(table("Cost per stage", ["stage", "seconds", "calls", "tokens read", "tokens generated", "of them cached", "FLOPs"], rows, "stages"));
  if (trace.levels.length) {
    box.appendChild(table(
      "The tree per iteration",
      ["iteration", "steps", "kept", "pruned", "finished", "open", "tokens"],
      trace.levels.map((l) => ({ cells: [l.iteration, l.nodes, l.kept, l.pruned, l.finished, l.open, l.tokens] })),
      "levels",
    ));
  }
  box.appendChild(table(
    "Candidates",
    ["#", "answer", "score", "finish", "tokens", "text"],
    trace.candidates.map((c) => ({
      cells: [c.index, c.answer, num(c.score), c.finish_reason, c.completion_tokens, c.text],
      selected: c.index === trace.selected,
      classes: [null, null, null, null, null, "text"],
    })),
    "candidates",
  ));
}
