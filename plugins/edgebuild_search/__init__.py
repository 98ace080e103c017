"""Built-in mixed-precision search strategies: sensitivity (default), exhaustive, uniform.

A strategy receives a SearchContext (layers, precisions, per-layer sensitivity, a byte estimate)
and returns the per-layer assignment to ship, or None. `context.evaluate(assignment)` builds and
runs it for real; every call counts against `search.max_evaluations`.
"""
import itertools

from edgebuild.api import SearchContext, SearchStrategy
from edgebuild.hookspecs import hookimpl
from edgebuild.reasons import candidate_reason


def _holds_floor(point: dict) -> bool:
    return not any(f["constraint"] == "accuracy" for f in point["failed"])


def pareto_chain(context: SearchContext) -> list[dict]:
    """Assignments from all-highest precision down to all-lowest, each step lowering the layer
    that costs the least proxy noise per byte saved: a list ordered by falling size."""
    # A layer with no precision to offer (the backend keeps it as converted) is left out.
    options = {layer["name"]: choices for layer in context.layers if (choices := context.options(layer))}
    current = {name: choices[0] for name, choices in options.items()}
    chain = [dict(current)]
    while True:
        moves = []
        for layer in context.layers:
            if layer["name"] not in options:
                continue
            names = options[layer["name"]]
            position = names.index(current[layer["name"]])
            if position + 1 == len(names):
                continue
            now, lower = names[position], names[position + 1]
            saved = layer["params"] * (context.precisions[now] - context.precisions[lower]) / 8
            sensitivity = context.sensitivity[layer["name"]]
            cost = max(0.0, 10 ** (-sensitivity[lower] / 10) - 10 ** (-sensitivity[now] / 10))
            moves.append((cost / max(saved, 1e-9), layer["name"], lower))
        if not moves:
            return chain
        _, name, lower = min(moves)
        current[name] = lower
        chain.append(dict(current))


def sensitivity_search(context: SearchContext):
    """Binary search along the Pareto chain for the smallest assignment holding the floor, then a
    short local search from there; a handful of full evaluations instead of all of them."""
    chain = pareto_chain(context)
    context.notes.append(f"Pareto chain of {len(chain)} assignments from per-layer sensitivity")
    lowest = context.evaluate(chain[-1])
    if _holds_floor(lowest):
        best = len(chain) - 1
    else:
        first = context.evaluate(chain[0])
        if not _holds_floor(first):
            context.notes.append("even the highest precision on every layer misses the floor")
            return None
        good, bad = 0, len(chain) - 1
        while bad - good > 1 and context.budget_left():
            middle = (good + bad) // 2
            if _holds_floor(context.evaluate(chain[middle])):
                good = middle
            else:
                bad = middle
        best = good
    assignment = chain[best]
    point = context.evaluate(assignment)
    # Local search: lower one more layer off the chain, largest estimated saving first.
    neighbours = []
    for layer in context.layers:
        names = context.options(layer)
        if layer["name"] not in assignment:
            continue
        position = names.index(assignment[layer["name"]])
        if position + 1 < len(names):
            neighbour = {**assignment, layer["name"]: names[position + 1]}
            if neighbour not in chain:
                neighbours.append(neighbour)
    neighbours.sort(key=context.estimate_bytes)
    for neighbour in neighbours[:2]:
        if not context.budget_left():
            break
        candidate = context.evaluate(neighbour)
        if candidate["status"] == "pass" and candidate["bytes"] < point["bytes"]:
            assignment, point = neighbour, candidate
    if point["status"] != "pass":
        blocked = candidate_reason({"status": point["status"], "failed": point["failed"]}, exact=True)
        context.notes.append(f"the smallest assignment holding the floor still fails: {blocked}")
        return None
    return assignment


def exhaustive_search(context: SearchContext):
    """Every assignment over the per-layer grid, smallest estimated first (an audit mode)."""
    grid = [dict(zip([layer["name"] for layer in context.layers], combo))
            for combo in itertools.product(*(context.options(layer) for layer in context.layers))]
    grid.sort(key=context.estimate_bytes)
    if len(grid) > context.max_evaluations:
        context.notes.append(f"grid of {len(grid)} assignments cut to max_evaluations={context.max_evaluations}")
    passing = []
    for assignment in grid:
        if not context.budget_left():
            break
        point = context.evaluate(assignment)
        if point["status"] == "pass":
            passing.append(point)
    if not passing:
        return None
    # Fewest bytes; on a tie the better metric in its own direction (lower kl, higher top1).
    return min(passing, key=context.better)["assignment"]


@hookimpl
def register_search_strategies(register):
    register(SearchStrategy("sensitivity", sensitivity_search,
                            "Pareto chain from per-layer sensitivity, binary search, short local search"))
    register(SearchStrategy("exhaustive", exhaustive_search, "every assignment over the per-layer grid (audit)"))
    # Declared, not inferred: this strategy never searches (no sensitivity table, no search stage).
    register(SearchStrategy("uniform", None, "stock whole-model recipes only"))
