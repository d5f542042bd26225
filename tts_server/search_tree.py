"""The tree a step search grows, recorded where the search decides (beam selection, DVTS
subtrees), so nothing has to be guessed back from the candidates afterwards.

A strategy gets one `SearchTree` on `SearchConfig.tree` when the request's trace is wanted (the
response's `tts.trace`, the trace export or the inspector) and None otherwise: every call site
checks for None, so a search without a trace pays nothing. Node 0 is the prompt; every step a
search samples is a node whose parent is the node of the prefix it continued. A candidate carries
its node's id (`Candidate.node`), and a beam's copies carry the id of the node they copy, so the
next step of any copy hangs under it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tts_server.types import Candidate

# kept: survived a selection and was continued; pruned: dropped by one (a beam search's ranking,
# a DVTS subtree's greedy choice, or the final top-N cut); finished: ended its solution;
# open: neither, when the search stopped (iteration limit, deadline, enough finished beams).
NodeStatus = Literal["kept", "pruned", "finished", "open"]
ROOT = 0


@dataclass
class TreeNode:
    id: int
    parent: int | None
    iteration: int
    subtree: int | None
    text: str  # what this step added to its parent's text
    tokens: int  # tokens this step generated
    candidate: Candidate | None  # the prefix ending here (None: the root)
    status: NodeStatus = "open"

    @property
    def depth(self) -> int:
        return 0 if self.candidate is None else len(self.candidate.steps)

    @property
    def score(self) -> float | None:
        """The PRM's score of this node's last step (None: not scored)."""
        c = self.candidate
        return c.step_scores[-1] if c is not None and c.step_scores else None

    def live(self) -> dict[str, Any]:
        """The compact form a stream's progress chunks carry (no text: the final trace has it)."""
        c = self.candidate
        return {
            "id": self.id,
            "parent": self.parent,
            "iteration": self.iteration,
            "subtree": self.subtree,
            "status": self.status,
            "score": self.score,
            "answer": c.answer if c is not None and c.finished else None,
        }


class SearchTree:
    """One request's search tree, grown by its strategy."""

    def __init__(self) -> None:
        self.nodes: list[TreeNode] = [TreeNode(ROOT, None, 0, None, "", 0, None, "kept")]
        self._changed: dict[int, None] = {}  # ids changed since the last `drain`, in order

    def grow(
        self,
        parents: Sequence[Candidate],
        children: Sequence[Sequence[Candidate]],
        iteration: int,
        subtrees: Sequence[int] | None = None,
    ) -> None:
        """children[i] continued parents[i] at `iteration` (1 is the first step)."""
        for k, (parent, kids) in enumerate(zip(parents, children, strict=True)):
            parent_id = parent.node if parent.node is not None else ROOT
            before_text, before_tokens = parent.text, len(parent.token_ids)
            for child in kids:
                text = child.text
                added = text[len(before_text) :] if text.startswith(before_text) else ""
                node = TreeNode(
                    id=len(self.nodes),
                    parent=parent_id,
                    iteration=iteration,
                    subtree=None if subtrees is None else subtrees[k],
                    text=added,
                    tokens=max(0, len(child.token_ids) - before_tokens),
                    candidate=child,
                )
                child.node = node.id
                self.nodes.append(node)
                self._changed[node.id] = None

    def mark(self, candidates: Iterable[Candidate], status: NodeStatus) -> None:
        for candidate in candidates:
            if candidate.node is not None and candidate.node != ROOT:
                self.nodes[candidate.node].status = status
                self._changed[candidate.node] = None

    def settle(self, candidates: Iterable[Candidate], kept: Iterable[Candidate]) -> None:
        """After a selection: finished ones finished, `kept` kept, every other one pruned."""
        survivors = {id(c) for c in kept}
        for candidate in candidates:
            if candidate.finished:
                status: NodeStatus = "finished"
            else:
                status = "kept" if id(candidate) in survivors else "pruned"
            self.mark([candidate], status)

    def drain(self) -> list[dict[str, Any]]:
        """The nodes added or changed since the last call, as they are now (a stream sends them
        with its progress chunks)."""
        changed = [self.nodes[i].live() for i in self._changed]
        self._changed.clear()
        return changed

    def path(self, node: int | None) -> list[int]:
        """The node ids from the root to `node` (empty for None)."""
        if node is None:
            return []
        ids: list[int] = []
        at: int | None = node
        while at is not None:
            ids.append(at)
            at = self.nodes[at].parent
        return ids[::-1]
