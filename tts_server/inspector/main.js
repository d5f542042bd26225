// The inspector page: runs a search from the form (streamed, its trace asked for), grows the
// tree from the progress chunks' nodes, draws the finished trace, and opens stored ones by id.

import { getTrace, recentTraces, runSearch } from "/inspector/static/api.js";
import { drawTree } from "/inspector/static/tree.js";
import { summary, tables } from "/inspector/static/report.js";

const $ = (id) => document.getElementById(id);
const KEY = "tts-inspector-key";

function status(state, text) {
  $("status").dataset.state = state;
  $("status").textContent = text;
}

function showError(error) {
  const box = $("error");
  box.hidden = false;
  const where = error.param ? ` (param: ${error.param})` : "";
  const code = error.code ? ` [${error.code}]` : "";
  box.textContent = `${error.status || ""} ${error.message}${where}${code}`;
  status("error", "error");
}

function clear() {
  $("error").hidden = true;
  $("summary").textContent = "";
  $("tables").textContent = "";
  drawTree($("tree"), []);
}

function show(id, trace) {
  summary($("summary"), id, trace);
  tables($("tables"), trace);
  if (trace.kind === "tree") {
    drawTree($("tree"), trace.nodes, trace.selected_path);
  } else {
    // Whole samples: the prompt with one leaf per sample, the selected one highlighted.
    const nodes = trace.candidates.map((c, i) => ({
      id: i + 1, parent: 0, iteration: 1, status: c.finished ? "finished" : "open",
      score: c.score, answer: c.answer, candidate: c.index, text: c.text,
    }));
    drawTree($("tree"), nodes, [0, trace.selected + 1]);
  }
  status("done", `done: ${id}`);
}

function key() {
  const value = $("key").value.trim();
  sessionStorage.setItem(KEY, value);
  return value;
}

async function refresh() {
  const list = $("recent");
  list.textContent = "";
  try {
    for (const item of await recentTraces(key())) {
      const li = document.createElement("li");
      const a = document.createElement("a");
      a.textContent = item.id;
      a.addEventListener("click", () => open(item.id));
      li.appendChild(a);
      li.appendChild(document.createTextNode(` ${item.strategy} @${item.budget} → ${item.answer ?? "–"}`));
      list.appendChild(li);
    }
  } catch (error) {
    showError(error);
  }
}

async function open(id) {
  clear();
  status("running", `opening ${id}`);
  try {
    const body = await getTrace(key(), id);
    $("open-id").value = body.id;
    show(body.id, body.trace);
  } catch (error) {
    showError(error);
  }
}

async function run(event) {
  event.preventDefault();
  clear();
  const mode = document.querySelector("input[name=mode]:checked").value;
  const text = $("prompt").value.trim() || $("prompt").placeholder;
  const live = new Map();
  let shown = 0;
  status("running", "starting");
  $("run").disabled = true;
  try {
    const { id, tts } = await runSearch(
      {
        key: key(), mode, text, strategy: $("strategy").value,
        budget: Number($("budget").value), beamWidth: Number($("beam-width").value),
      },
      (chunk) => {
        const tts = chunk.tts || {};
        if (!tts.progress) return;
        for (const node of tts.nodes || []) live.set(node.id, node);
        const p = tts.progress;
        status("running", `searching: ${p.candidates_finished ?? 0} finished, ${p.policy_calls ?? 0} policy calls, ` +
          `${p.completion_tokens ?? 0} tokens, ${p.prm_steps_scored ?? 0} steps scored, ${live.size} nodes`);
        if (live.size !== shown) {
          shown = live.size;
          $("tree").dataset.liveNodes = String(shown); // how far the live view grew
          drawTree($("tree"), [...live.values()]);
        }
      },
    );
    $("open-id").value = id;
    show(id, tts.trace);
    refresh();
  } catch (error) {
    showError(error);
  } finally {
    $("run").disabled = false;
  }
}

$("key").value = sessionStorage.getItem(KEY) || "";
$("run-form").addEventListener("submit", run);
$("open-form").addEventListener("submit", (event) => {
  event.preventDefault();
  open($("open-id").value.trim());
});
$("refresh").addEventListener("click", refresh);
const fromHash = decodeURIComponent(location.hash.slice(1));
if (fromHash) open(fromHash);
status("idle", "ready");
