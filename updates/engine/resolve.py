"""Which releases a node needs to take one component to a target version.

A node runs several components (`themisdb`, `themis-storage`, `themis-query`, plugins),
each released on its own, each release declaring manifest `dependencies` on the others
(required, optional or conflicts; docs/bundle-format.md). `resolve` picks, with
resolvelib's backtracking, the newest releases that satisfy every constraint: the
target's, those of the releases it brings in, and those of the releases already
installed that stay. It never downgrades an installed component other than an explicit
target, leaves alone what nothing forces to change, and returns the steps in an order
that installs dependencies before their dependents.

A component that is not installed is modelled as a candidate of its own, "absent": it
satisfies optional dependencies and conflicts but no required one, so resolvelib itself
decides when an optional or conflicting component must be installed or upgraded.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from itertools import combinations
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version
from resolvelib import AbstractProvider, BaseReporter, Resolver
from resolvelib.resolvers import (
    RequirementInformation,
    ResolutionImpossible,
    ResolutionTooDeep,
)

from .manifest import Dependency

# Rounds resolvelib may take (one per pin or backtrack) before the search is given up.
MAX_ROUNDS = 20_000
# Rounds for each retry with a newer target pinned (see _newer_target).
RETRY_ROUNDS = 2_000
# Releases named in an explanation, newest first; more would bury the sentence.
KNOWN_SHOWN = 8


@dataclass(frozen=True)
class Candidate:
    """One release of a component, as the dashboard knows it."""

    product: str
    version: str
    dependencies: tuple[Dependency, ...] = ()
    key: str = ""  # the dashboard's release id, as text


@dataclass(frozen=True)
class PlanStep:
    product: str
    version: str
    from_version: str | None  # None: a fresh install
    key: str


@dataclass(frozen=True)
class UpdatePlan:
    """Only components whose version changes, dependencies before their dependents."""

    steps: tuple[PlanStep, ...]


class ResolutionFailed(Exception):
    """No set of releases satisfies every constraint; `explanation` says which clash."""

    def __init__(self, explanation: str) -> None:
        super().__init__(explanation)
        self.explanation = explanation


class DependencyCycle(ResolutionFailed):
    """Components in the plan depend on each other in a circle: no order installs them
    one at a time with their dependencies already in place."""

    def __init__(self, cycle: Sequence[str]) -> None:
        self.cycle = tuple(cycle)
        super().__init__("the dependencies form a cycle: " + " -> ".join(self.cycle))


# --- what resolvelib works with ----------------------------------------------------------

_REQUIRED, _OPTIONAL, _CONFLICTS, _TARGET, _INSTALLED = (
    "required",
    "optional",
    "conflicts",
    "target",
    "installed",
)


@dataclass(eq=False, slots=True)  # by identity: hashed thousands of times per resolve
class _Requirement:
    product: str
    constraint: str
    kind: str  # one of the five above; target and installed come from the request itself
    # The product's options that satisfy it, one bit each by _Option.index, once the
    # catalogue has worked them out (_Catalogue.allowed); each belongs to one resolve.
    allowed: int | None = field(default=None, repr=False)

    @property
    def admits_absent(self) -> bool:
        return self.kind in (_OPTIONAL, _CONFLICTS)


@dataclass(frozen=True, eq=False)  # compared by identity: each is made once per resolve
class _Option:
    """A release resolvelib may pin, or the component left uninstalled (version None)."""

    product: str
    version: str | None
    parsed: Version | None
    dependencies: tuple[Dependency, ...]
    key: str
    installed: bool
    index: int = -1  # its place in the component's options: its bit in a requirement's mask

    def label(self) -> str:
        return f"{self.product} {self.version}" if self.version else f"no {self.product}"


# A dashboard resolves the same releases again and again: parsing and matching versions
# is what would dominate without these caches.
@lru_cache(maxsize=65_536)
def _version(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


@lru_cache(maxsize=4096)
def _specifier(text: str) -> SpecifierSet:
    return SpecifierSet(text)


@lru_cache(maxsize=262_144)
def _contains(constraint: str, version: str, prereleases: bool | None) -> bool:
    """Whether `constraint` admits `version`; None: pre-releases only when it names one."""
    specifier = _specifier(constraint)
    parsed = _version(version)
    if parsed is None:
        return False
    if prereleases is None:
        prereleases = bool(specifier.prereleases)
    return specifier.contains(parsed, prereleases=prereleases)


def _satisfies(requirement: _Requirement, option: _Option) -> bool:
    if option.version is None:
        return requirement.admits_absent
    # An installed release is judged as it is, and a conflict matches pre-releases too;
    # otherwise a pre-release only when the constraint names one (as pip does).
    conflict = requirement.kind == _CONFLICTS
    prereleases = True if option.installed or conflict else None
    allowed = _contains(requirement.constraint, option.version, prereleases)
    return not allowed if conflict else allowed


def _as_requirement(dependency: Dependency, owner: _Option) -> _Requirement:
    try:
        _specifier(dependency.constraint)
    except InvalidSpecifier:
        # Manifests are checked when published; a stored row may still be older or edited.
        raise ResolutionFailed(
            f"{owner.label()} declares {dependency.product} {dependency.constraint!r},"
            " which is not a PEP 440 specifier"
        ) from None
    if dependency.conflicts:
        kind = _CONFLICTS
    elif dependency.optional:
        kind = _OPTIONAL
    else:
        kind = _REQUIRED
    return _Requirement(dependency.product, dependency.constraint, kind)


def _parse(version: str, where: str) -> Version:
    try:
        return Version(version)
    except InvalidVersion:
        raise ResolutionFailed(f"{where}: {version!r} is not a version") from None


class _Catalogue:
    """Every component's options, in the order resolvelib should try them."""

    def __init__(
        self,
        target: str,
        version: str | None,
        installed: Mapping[str, str],
        available: Mapping[str, Sequence[Candidate]],
    ) -> None:
        self.target, self.version, self.installed = target, version, installed
        self.available = available
        self._options: dict[str, list[_Option]] = {}
        self._requirements: dict[int, list[_Requirement]] = {}
        self._subsets: dict[tuple[str, int], tuple[_Option, ...]] = {}

    def options(self, product: str) -> list[_Option]:
        if product not in self._options:
            self._options[product] = self._build(product)
        return self._options[product]

    def releases(self, product: str) -> list[_Option]:
        """Known releases, newest first (without the absent option)."""
        found = [o for o in self.options(product) if o.parsed is not None]
        return sorted(found, key=lambda o: o.parsed or Version("0"), reverse=True)

    def allowed(self, requirement: _Requirement) -> int:
        """The options of the product that satisfy the requirement, as a bit mask.
        resolvelib asks the same questions thousands of times (every pin is rechecked
        each round, every clash refilters); matching versions each time would dominate."""
        found = requirement.allowed
        if found is None:
            options = self.options(requirement.product)
            found = sum(1 << o.index for o in options if _satisfies(requirement, o))
            requirement.allowed = found
        return found

    def subset(self, product: str, mask: int) -> tuple[_Option, ...]:
        """The options whose bits are set, in preference order."""
        key = (product, mask)
        found = self._subsets.get(key)
        if found is None:
            found = tuple(o for o in self.options(product) if mask >> o.index & 1)
            self._subsets[key] = found
        return found

    def dependencies_of(self, option: _Option) -> list[_Requirement]:
        found = self._requirements.get(id(option))
        if found is None:
            found = [
                _as_requirement(d, option)
                for d in option.dependencies
                if d.product != option.product
            ]
            self._requirements[id(option)] = found
        return found

    def _build(self, product: str) -> list[_Option]:
        current = self.installed.get(product)
        current_parsed = _parse(current, f"installed {product}") if current else None
        releases: dict[Version, _Option] = {}
        for candidate in self.available.get(product, ()):
            parsed = _version(candidate.version)
            if parsed is None:
                continue  # a release the dashboard cannot order is never picked
            is_installed = parsed == current_parsed
            releases.setdefault(
                parsed,
                _Option(
                    product,
                    candidate.version,
                    parsed,
                    candidate.dependencies,
                    candidate.key,
                    is_installed,
                ),
            )
        if current and current_parsed is not None and current_parsed not in releases:
            # Installed but unknown to the dashboard: it stays, declaring nothing.
            releases[current_parsed] = _Option(product, current, current_parsed, (), "", True)
        newest_first = [releases[v] for v in sorted(releases, reverse=True)]
        ordered = self._order(product, newest_first)
        return [replace(option, index=index) for index, option in enumerate(ordered)]

    def _order(self, product: str, newest_first: list[_Option]) -> list[_Option]:
        if product == self.target:
            return newest_first  # the target moves to the newest release that fits
        installed = [o for o in newest_first if o.installed]
        if installed:
            # What is installed stays unless something forces it; then the newest.
            return installed + [o for o in newest_first if not o.installed]
        absent = _Option(product, None, None, (), "", False)
        return [absent, *newest_first]


_Cause = RequirementInformation[_Requirement, _Option]


class _Trail(BaseReporter[_Requirement, _Option, str]):
    """Who last asked for each component, and when: an explanation says why a release
    that takes part in a clash is there at all, and the next component to decide is the
    one asked for last."""

    def __init__(self) -> None:
        self.wanted_by: dict[str, _Option | None] = {}
        self.asked: dict[str, int] = {}
        self._clock = 0
        # Clashes met while searching, by component: the one met most often is the one
        # to explain (resolvelib's final clash can be a side road of the search).
        self.clashes: dict[str, int] = {}
        self.last_clash: dict[str, list[_Cause]] = {}

    def adding_requirement(self, requirement: _Requirement, parent: _Option | None) -> None:
        self._clock += 1
        self.wanted_by[requirement.product] = parent
        self.asked[requirement.product] = self._clock

    def resolving_conflicts(self, causes: Collection[_Cause]) -> None:
        for product in {info.requirement.product for info in causes}:
            self.clashes[product] = self.clashes.get(product, 0) + 1
            self.last_clash[product] = [c for c in causes if c.requirement.product == product]

    def worst_clash(self, final: Sequence[_Cause] = ()) -> Sequence[_Cause]:
        """The causes to explain: those of the component that clashed most often, the
        final ones when it is theirs (or nothing clashed before)."""
        final_product = final[0].requirement.product if final else None
        if not self.clashes:
            return final
        worst = max(self.clashes, key=lambda p: (self.clashes[p], p == final_product))
        return final if worst == final_product else self.last_clash[worst]


class _Provider(AbstractProvider[_Requirement, _Option, str]):
    def __init__(self, catalogue: _Catalogue, trail: _Trail) -> None:
        self.catalogue = catalogue
        self.trail = trail

    def identify(self, requirement_or_candidate: _Requirement | _Option) -> str:
        return requirement_or_candidate.product

    def get_preference(
        self,
        identifier: str,
        resolutions: Mapping[str, _Option],
        candidates: Mapping[str, Iterator[_Option]],
        information: Mapping[str, Iterator[RequirementInformation[_Requirement, _Option]]],
        backtrack_causes: Sequence[RequirementInformation[_Requirement, _Option]],
    ) -> Any:
        # Not reached while narrow_requirement_selection returns one name; kept to the
        # same order so the two can never disagree.
        return (identifier != self.catalogue.target, identifier)

    def narrow_requirement_selection(
        self,
        identifiers: Iterable[str],
        resolutions: Mapping[str, _Option],
        candidates: Mapping[str, Iterator[_Option]],
        information: Mapping[str, Iterator[RequirementInformation[_Requirement, _Option]]],
        backtrack_causes: Sequence[RequirementInformation[_Requirement, _Option]],
    ) -> Iterable[str]:
        """The one component to decide next. The target first: it is tried newest first
        and what it needs follows it. After a clash, the components behind it (as pip
        does), so the backtracking stays near the cause. Then depth first (below).
        Choosing one here spares resolvelib a preference sort over every open component
        in every round, which was the larger part of its time."""
        names = set(identifiers)
        if self.catalogue.target in names:
            return [self.catalogue.target]
        if backtrack_causes:
            causes = {info.requirement.product for info in backtrack_causes}
            causes |= {info.parent.product for info in backtrack_causes if info.parent}
            near = names & causes
            if near:
                names = near
        # Depth first: what the last decision brought in is decided next, so a clash
        # between a release's dependencies shows while few other decisions sit above it
        # (backtracking then has little to undo). Ties (the first roots) by name.
        asked = self.trail.asked
        return [max(names, key=lambda name: (asked.get(name, 0), name))]

    def find_matches(
        self,
        identifier: str,
        requirements: Mapping[str, Iterator[_Requirement]],
        incompatibilities: Mapping[str, Iterator[_Option]],
    ) -> Iterable[_Option]:
        # Every known constraint prunes here, before resolvelib tries anything.
        mask = (1 << len(self.catalogue.options(identifier))) - 1
        for requirement in requirements[identifier]:
            mask &= self.catalogue.allowed(requirement)
        for option in incompatibilities[identifier]:
            mask &= ~(1 << option.index)
        return self.catalogue.subset(identifier, mask)

    def is_satisfied_by(self, requirement: _Requirement, candidate: _Option) -> bool:
        return bool(self.catalogue.allowed(requirement) >> candidate.index & 1)

    def get_dependencies(self, candidate: _Option) -> Iterable[_Requirement]:
        return self.catalogue.dependencies_of(candidate)


# --- resolve ---------------------------------------------------------------------------


def resolve(
    target: str,
    version: str | None,
    installed: Mapping[str, str],
    available: Mapping[str, Sequence[Candidate]],
) -> UpdatePlan:
    """The steps that take `target` to `version` (None: the newest release that fits)
    with every component's constraints satisfied; raise ResolutionFailed saying why
    there is none, DependencyCycle naming the cycle."""
    catalogue = _Catalogue(target, version, installed, available)
    _check_target(catalogue)
    roots = _roots(catalogue)
    mapping = _run(catalogue, roots)
    if version is None:
        mapping = _newer_target(catalogue, roots, mapping)
    return UpdatePlan(_ordered_steps(mapping, catalogue))


def _run(
    catalogue: _Catalogue, roots: Sequence[_Requirement], max_rounds: int | None = None
) -> Mapping[str, _Option]:
    max_rounds = max_rounds or MAX_ROUNDS
    trail = _Trail()
    resolver: Resolver[_Requirement, _Option, str] = Resolver(_Provider(catalogue, trail), trail)
    try:
        return resolver.resolve(roots, max_rounds=max_rounds).mapping
    except ResolutionImpossible as exc:
        raise ResolutionFailed(
            _explain(trail.worst_clash(list(exc.causes)), catalogue, trail)
        ) from None
    except ResolutionTooDeep:
        gave_up = (
            f"no combination of releases was found for {catalogue.target} within"
            f" {max_rounds} steps of the search; name a version to narrow it"
        )
        worst = trail.worst_clash()
        if worst:
            gave_up += f". The clash met most often: {_explain(worst, catalogue, trail)}"
        raise ResolutionFailed(gave_up) from None


def _newer_target(
    catalogue: _Catalogue, roots: Sequence[_Requirement], found: Mapping[str, _Option]
) -> Mapping[str, _Option]:
    """The newest target release that fits. resolvelib may keep an installed component
    and move the target back instead (both fit); so each newer target release is tried
    pinned, newest first. Usually the first answer already has the newest: no retry."""
    chosen = found[catalogue.target].parsed or Version("0")
    newer = [
        option
        for option in catalogue.releases(catalogue.target)
        if option.parsed is not None
        and option.parsed > chosen
        and all(_satisfies(root, option) for root in roots if root.product == catalogue.target)
    ]
    for option in newer:
        pinned = [
            _Requirement(root.product, f"=={option.version}", _TARGET)
            if root.kind == _TARGET
            else root
            for root in roots
        ]
        try:
            # A smaller budget: an answer is already in hand, this only looks for a
            # newer one.
            return _run(catalogue, pinned, max_rounds=RETRY_ROUNDS)
        except ResolutionFailed:
            continue
    return found


def _check_target(catalogue: _Catalogue) -> None:
    target, version = catalogue.target, catalogue.version
    releases = catalogue.releases(target)
    if not catalogue.available.get(target):
        raise ResolutionFailed(f"no release of {target} is known")
    if version is not None:
        wanted = _parse(version, f"{target} version")
        if not any(option.parsed == wanted for option in releases):
            raise ResolutionFailed(
                f"{target} {version} is not a known release ({_known(releases)})"
            )


def _roots(catalogue: _Catalogue) -> list[_Requirement]:
    target, version = catalogue.target, catalogue.version
    roots = [_Requirement(target, f"=={version}" if version else "", _TARGET)]
    for product, current in sorted(catalogue.installed.items()):
        if product == target and version is not None:
            continue  # an explicit target version may be a downgrade
        # Installed components stay installed, at their version or a newer one (a local
        # label, `+build`, cannot stand in a >= specifier and does not order releases).
        floor = _parse(current, f"installed {product}").public
        roots.append(_Requirement(product, f">={floor}", _INSTALLED))
    return roots


# --- the plan ----------------------------------------------------------------------------


def _ordered_steps(mapping: Mapping[str, _Option], catalogue: _Catalogue) -> tuple[PlanStep, ...]:
    present = {p: o for p, o in mapping.items() if o.version is not None}
    edges = {
        product: sorted(
            {r.product for r in catalogue.dependencies_of(option) if r.kind != _CONFLICTS}
            & set(present)
        )
        for product, option in present.items()
    }
    changing = {p for p, o in present.items() if not o.installed}
    components = _components(edges)
    _refuse_cycles(edges, components, changing, present)
    # What is left are cycles among components that stay: their members need no order
    # among themselves, and without those edges the graph has no cycle to stall on.
    component_of = {member: i for i, component in enumerate(components) for member in component}
    acyclic = {
        p: [n for n in needs if component_of[n] != component_of[p]] for p, needs in edges.items()
    }
    order = _topological(acyclic, catalogue.target)
    return tuple(
        PlanStep(p, str(present[p].version), catalogue.installed.get(p), present[p].key)
        for p in order
        if p in changing
    )


def _topological(edges: Mapping[str, Sequence[str]], target: str) -> list[str]:
    """Dependencies first; among what is ready, the target last, the rest by name."""
    waiting = {product: len(needs) for product, needs in edges.items()}
    dependents: dict[str, list[str]] = {product: [] for product in edges}
    for product, needs in edges.items():
        for need in needs:
            dependents[need].append(product)
    ready = [(p == target, p) for p, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, product = heapq.heappop(ready)
        order.append(product)
        for dependent in dependents[product]:
            waiting[dependent] -= 1
            if waiting[dependent] == 0:
                heapq.heappush(ready, (dependent == target, dependent))
    return order


def _refuse_cycles(
    edges: Mapping[str, Sequence[str]],
    components: Sequence[set[str]],
    changing: set[str],
    present: Mapping[str, _Option],
) -> None:
    """A cycle among components that all stay as they are needs no order; one through a
    component that changes does."""
    for component in components:
        if len(component) > 1 and component & changing:
            cycle = _cycle_within(edges, component)
            raise DependencyCycle([present[p].label() for p in cycle] + [cycle[0]])


def _components(edges: Mapping[str, Sequence[str]]) -> list[set[str]]:
    """Strongly connected components (Tarjan's algorithm, without recursion)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(edges[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    found.append(component)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(edges[child])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def _cycle_within(edges: Mapping[str, Sequence[str]], component: set[str]) -> list[str]:
    """The shortest cycle through the component's first member by name (a, b, ... with
    the last one depending on a): breadth first from it, back to it."""
    start = min(component)
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in edges[node]:
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return path[::-1]
            if child in component and child not in came_from:
                came_from[child] = node
                queue.append(child)
    return [start]  # not reached: every member of a component reaches the others


# --- explanations ------------------------------------------------------------------------


def _explain(causes: Sequence[_Cause], catalogue: _Catalogue, trail: _Trail) -> str:
    """`A needs P x, but B needs P y; no release of P satisfies both`."""
    product = causes[0].requirement.product
    groups = _group([c for c in causes if c.requirement.product == product])
    clash = _smallest_clash(groups, catalogue)
    reasons = [_reason(group, catalogue, trail) for group in clash]
    releases = catalogue.releases(product)
    if not releases:
        return f"{reasons[0]}, but {product} has no release"
    if len(reasons) == 1:
        return f"{reasons[0]}, but no release of {product} satisfies it ({_known(releases)})"
    both = "both" if len(reasons) == 2 else "all of them"
    return (
        f"{reasons[0]}, but {' and '.join(reasons[1:])}; no release of {product}"
        f" satisfies {both} ({_known(releases)})"
    )


def _group(causes: Sequence[_Cause]) -> list[list[_Cause]]:
    """Causes that say the same thing from releases of the same component, together:
    resolvelib lists each release of a component it tried, one sentence each."""
    groups: dict[tuple[str | None, str, str], list[_Cause]] = {}
    for info in causes:
        requirement = info.requirement
        key = (
            info.parent.product if info.parent else None,
            requirement.constraint,
            requirement.kind,
        )
        groups.setdefault(key, []).append(info)
    return list(groups.values())


def _smallest_clash(groups: list[list[_Cause]], catalogue: _Catalogue) -> list[list[_Cause]]:
    """The fewest of the causes that no release satisfies together: resolvelib hands over
    every requirement on the component, bystanders included. The update's own
    requirements go last, so the sentence starts with what the releases declare."""
    ordered = sorted(groups, key=lambda g: g[0].requirement.kind in (_TARGET, _INSTALLED))
    product = ordered[0][0].requirement.product
    # Every release and "not installed": what an installed component may become is
    # limited by its own requirement, which takes part in the clash like any other.
    options = [*catalogue.releases(product), _Option(product, None, None, (), "", False)]

    def clashes(subset: Sequence[list[_Cause]]) -> bool:
        return not any(all(_satisfies(g[0].requirement, o) for g in subset) for o in options)

    if len(ordered) > 8:
        # Too many subsets to try them all: drop, from the last, each one not needed.
        kept = list(ordered)
        for group in reversed(ordered):
            rest = [g for g in kept if g is not group]
            if rest and clashes(rest):
                kept = rest
        return kept
    for size in range(1, len(ordered)):
        for subset in combinations(ordered, size):
            if clashes(subset):
                return list(subset)
    return ordered


def _reason(group: Sequence[_Cause], catalogue: _Catalogue, trail: _Trail) -> str:
    requirement, parent = group[0].requirement, group[0].parent
    product, constraint = requirement.product, requirement.constraint
    if requirement.kind == _TARGET:
        asked = f"{product} {catalogue.version}" if catalogue.version else f"the newest {product}"
        return f"the update asks for {asked}"
    if requirement.kind == _INSTALLED:
        current = catalogue.installed[product]
        return f"{product} {current} is installed (kept or upgraded, never removed or downgraded)"
    who = _who(parent, catalogue, trail) if parent else "the update"
    others = len({id(info.parent) for info in group}) - 1
    if parent and others:
        who += f" and {others} other release{'s' if others > 1 else ''} of {parent.product}"
    verb = "need" if others else "needs"
    wanted = f"{product} {constraint}" if constraint else product
    if requirement.kind == _CONFLICTS:
        verb = "conflict" if others else "conflicts"
        return f"{who} {verb} with {wanted if constraint else 'any ' + product}"
    if requirement.kind == _OPTIONAL:
        return f"{who} {verb} {wanted} when it is installed"
    return f"{who} {verb} {wanted}"


def _who(option: _Option, catalogue: _Catalogue, trail: _Trail) -> str:
    """`themis-query 1.4.5 (needed by themisdb 1.5.0)`: the chain up to the target or an
    installed release (`themis-query 1.4.5 (installed)`), at most four links."""
    links = [_link(option, catalogue)]
    seen = {option.product}
    while len(links) < 4 and option.product != catalogue.target and not option.installed:
        parent = trail.wanted_by.get(option.product)
        if parent is None or parent.product in seen:
            break
        links.append(_link(parent, catalogue))
        seen.add(parent.product)
        option = parent
    if len(links) == 1:
        return links[0]
    return f"{links[0]} (needed by {', needed by '.join(links[1:])})"


def _link(option: _Option, catalogue: _Catalogue) -> str:
    if option.installed and option.product != catalogue.target:
        return f"{option.label()} (installed)"
    return option.label()


def _known(releases: Sequence[_Option]) -> str:
    shown = ", ".join(str(o.version) for o in releases[:KNOWN_SHOWN])
    more = f" and {len(releases) - KNOWN_SHOWN} older" if len(releases) > KNOWN_SHOWN else ""
    return f"releases: {shown}{more}" if releases else "no releases"


# --- what is installed -------------------------------------------------------------------


def installed_conflicts(
    installed: Mapping[str, str], declared: Mapping[str, Sequence[Dependency]]
) -> list[str]:
    """Problems among the installed components, one sentence each; `declared` holds each
    installed product's dependencies as its installed release declares them."""
    problems = []
    for product in sorted(declared):
        if product not in installed:
            continue
        owner = f"{product} {installed[product]}"
        for dependency in declared[product]:
            problem = _installed_problem(owner, dependency, installed.get(dependency.product))
            if problem:
                problems.append(problem)
    return problems


def _installed_problem(owner: str, dependency: Dependency, present: str | None) -> str | None:
    name, constraint = dependency.product, dependency.constraint
    wanted = f"{name} {constraint}" if constraint else name
    if present is None:
        return f"{owner} needs {wanted}, which is not installed" if dependency.required else None
    allowed = dependency.allows(present, prereleases=True)
    if dependency.conflicts and allowed:
        with_what = wanted if constraint else f"any {name}"
        return f"{owner} conflicts with {with_what}, but {name} {present} is installed"
    if not dependency.conflicts and not allowed:
        return f"{owner} needs {wanted}, but {name} {present} is installed"
    return None
