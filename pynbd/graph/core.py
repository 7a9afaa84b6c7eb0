"""The block graph: nodes, child links, permissions, freezing.

Every structural change (attach, detach, re-point) goes through :class:`BlockGraph`, which then
recomputes the permissions of every affected node in one :class:`Transaction`: either all of it
applies, or the graph is left exactly as it was and the error names the conflicting users.
Drivers never edit links; they only say what they take from a child (``BlockNode.child_perm``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterable, Iterator

from pynbd.graph.io import RequestGate, busy_section
from pynbd.graph.perms import ALL, NONE, Perm, Role
from pynbd.graph.transaction import Transaction
from pynbd.nodes.base import BlockNode

log = logging.getLogger("pynbd.graph")


class GraphError(Exception):
    """A graph change was refused; the graph is unchanged."""


class PermissionConflict(GraphError):
    pass


class FrozenLinkError(GraphError):
    pass


class GraphUser:
    """A root user of the graph: an export, a job, or a test. Not a node, but holds links like one."""

    def __init__(self, name: str, kind: str = "block-backend", description: str = "") -> None:
        self.name = name
        self.kind = kind  # as x-debug-query-block-graph names it: block-backend, block-job
        self.description = description or f"{kind} {name!r}"
        self.links: list[ChildLink] = []
        # Exports' requests wait at the gate while their node is drained. A job's do not (as
        # qemu's job BlockBackends, which disable request queuing): a job is held off by drains at
        # its busy() sections instead, and a guest request in flight may use the job's link (the
        # mirror filter's write-blocking writes to the target) without waiting for a drain that
        # waits for that very request.
        self.queues_requests = kind != "block-job"

    def __repr__(self) -> str:
        return f"GraphUser({self.name!r})"

    def link(self, node: BlockNode) -> ChildLink:
        """This user's link to ``node`` (its requests to that node go through it)."""
        for link in self.links:
            if link.node is node:
                return link
        raise GraphError(f"{self.description} does not use node {node.node_name!r}")

    def busy(self) -> contextlib.AbstractAsyncContextManager[None]:
        """A section of work that drains wait for as a whole (pynbd.graph.io.busy_section)."""
        return busy_section(self)


class ChildLink(RequestGate):
    """An edge from a parent (node or root user) to a child node, and the way requests reach
    the child: ``link.read_into(...)``, ``link.write(...)`` and the rest of the node interface
    go through the request gate (pynbd/graph/io.py), never to the driver directly."""

    def __init__(
        self, parent: BlockNode | GraphUser, name: str, node: BlockNode, role: Role, perm: Perm, shared: Perm
    ) -> None:
        self.parent = parent
        self.name = name
        self.node = node
        self.role = role
        self.perm = perm
        self.shared = shared
        #: who holds this link frozen, one entry per freeze ("job 'c'", "QMP client 2")
        self.holders: list[str] = []
        #: the holder that will change this link itself when it lets go (a job re-pointing or
        #: dropping a backing link at its completion), if any
        self.changer: str | None = None
        self.queues = isinstance(parent, GraphUser) and parent.queues_requests

    @property
    def is_root(self) -> bool:
        return isinstance(self.parent, GraphUser)

    @property
    def frozen(self) -> bool:
        return bool(self.holders)

    @property
    def freeze_count(self) -> int:
        return len(self.holders)

    def check_freeze(self, owner: str, changes: bool = False) -> None:
        """Raise FrozenLinkError unless ``owner`` may freeze this link (see :meth:`freeze`)."""
        if self.changer is not None and self.changer != owner:
            raise FrozenLinkError(f"Cannot freeze {self.ends()} for {owner}: it is being changed by {self.changer}")
        others = [holder for holder in dict.fromkeys(self.holders) if holder != owner]
        if changes and others:
            raise FrozenLinkError(f"Cannot change {self.ends()} for {owner}: it is frozen by {' and '.join(others)}")

    def freeze(self, owner: str, changes: bool = False) -> None:
        """Forbid removing or re-pointing this link until ``owner`` calls :meth:`unfreeze`.

        Holders that need the link *unchanged* share it, each with a freeze of its own. A holder
        that will change the link itself when it lets go (``changes``) must be the only one:
        it is refused while anyone else holds the link, and while it holds it nobody else may
        freeze it. So two jobs can never both be accepted and then collide at completion."""
        self.check_freeze(owner, changes)
        self.holders.append(owner)
        if changes:
            self.changer = owner

    def unfreeze(self, owner: str) -> None:
        if owner not in self.holders:
            raise GraphError(f"link {self.describe()} is not frozen by {owner}")
        self.holders.remove(owner)
        if self.changer == owner and owner not in self.holders:
            self.changer = None

    def ends(self) -> str:
        """qemu's words for the link: 'backing' link from 'top' to 'mid'."""
        return f"'{self.name}' link from '{_parent_name(self)}' to '{self.node.node_name}'"

    def frozen_error(self) -> FrozenLinkError:
        """The refusal of a change to this link while it is frozen, naming who holds it."""
        holders = " and ".join(dict.fromkeys(self.holders))
        return FrozenLinkError(f"Cannot change frozen {self.ends()}: it is frozen by {holders}")

    def describe(self) -> str:
        parent = self.parent
        if isinstance(parent, GraphUser):
            return f"{parent.description} (using node {self.node.node_name!r})"
        return f"node {parent.node_name!r} (its {self.name!r} child {self.node.node_name!r})"

    def __repr__(self) -> str:
        return f"ChildLink({self.describe()})"


def parent_nodes(node: BlockNode) -> Iterator[BlockNode]:
    for link in node.parents:
        if isinstance(link.parent, BlockNode):
            yield link.parent


def descendants(node: BlockNode) -> Iterator[BlockNode]:
    """The node and everything below it, each once."""
    seen: set[int] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack.extend(link.node for link in current.children.values())


#: The longest path of links from a root user down to a leaf node. Requests recurse down every
#: link (a filter passes them on, a qcow2 node reads what it lacks through its backing link), a
#: few Python frames a link, so an unbounded graph would end in RecursionError; this limit keeps
#: the deepest request well within Python's default recursion limit (1000 frames), with room for
#: the server's own frames. qemu has no such limit. Image chains stop earlier, at
#: pynbd.daemon.open.MAX_BACKING_CHAIN, leaving room for filters and jobs above them.
MAX_GRAPH_DEPTH = 200


def _height(node: BlockNode) -> int:
    """Links on the longest path from ``node`` down to a leaf (iterative: graphs may be deep)."""
    heights: dict[int, int] = {}
    stack: list[tuple[BlockNode, bool]] = [(node, False)]
    while stack:
        current, expanded = stack.pop()
        if id(current) in heights:
            continue
        children = [link.node for link in current.children.values()]
        if expanded:
            heights[id(current)] = max((heights[id(child)] + 1 for child in children), default=0)
            continue
        stack.append((current, True))
        stack.extend((child, False) for child in children if id(child) not in heights)
    return heights[id(node)]


def _depth(node: BlockNode) -> int:
    """Links on the longest path from a root user (or a parentless node) down to ``node``."""
    depths: dict[int, int] = {}
    stack: list[tuple[BlockNode, bool]] = [(node, False)]
    while stack:
        current, expanded = stack.pop()
        if id(current) in depths:
            continue
        parents = list(current.parents)
        if expanded:
            depths[id(current)] = max(
                (1 if link.is_root else depths[id(link.parent)] + 1 for link in parents), default=0
            )
            continue
        stack.append((current, True))
        above = (link.parent for link in parents if isinstance(link.parent, BlockNode))
        stack.extend((parent, False) for parent in above if id(parent) not in depths)
    return depths[id(node)]


def check_depth(parent_depth: int, child: BlockNode, what: str) -> None:
    """Refuse a link whose parent is ``parent_depth`` links below a root and whose child has the
    given graph below it, if the graph would grow deeper than MAX_GRAPH_DEPTH."""
    if parent_depth + 1 + _height(child) > MAX_GRAPH_DEPTH:
        raise GraphError(f"{what} would make the block graph more than {MAX_GRAPH_DEPTH} links deep (pynbd's limit)")


def filtered_or_cow_child(node: BlockNode) -> ChildLink | None:
    """One step down "the backing chain": through a filter's child or a COW (backing) link."""
    for link in node.children.values():
        if link.role & (Role.FILTERED | Role.COW):
            return link
    return None


def filters_below(node: BlockNode) -> Iterator[BlockNode]:
    """The node, then each node below it through filter links only (qemu's bdrv_filter_bs
    steps), down to the first node that is not a filter."""
    while True:
        yield node
        link = node.filter_child()
        if link is None:
            return
        node = link.node


def skip_filters(node: BlockNode) -> BlockNode:
    """The first node at or below ``node`` that is not a filter (qemu's bdrv_skip_filters)."""
    *_, last = filters_below(node)
    return last


def can_replace(source: BlockNode, node: BlockNode) -> bool:
    """Whether a copy of ``source`` may stand in for ``node`` (qemu's bdrv_recurse_can_replace):
    only if ``node`` is ``source`` or lies below it through filters only, so that both show the
    same data and replacing it changes nothing anyone reads."""
    return any(n is node for n in filters_below(source))


def chain_links(top: BlockNode, base: BlockNode | None) -> list[ChildLink]:
    """The filter/COW links from ``top`` down to ``base`` (exclusive of base's own links)."""
    links = []
    node = top
    while node is not base:
        link = filtered_or_cow_child(node)
        if link is None:
            if base is None:
                break
            raise GraphError(f"node {base.node_name!r} is not in the backing chain of {top.node_name!r}")
        links.append(link)
        node = link.node
    return links


class BlockGraph:
    def __init__(self) -> None:
        self.nodes: dict[str, BlockNode] = {}
        self._auto = 0

    # -- nodes ----------------------------------------------------------------------------------

    def auto_name(self) -> str:
        """A node-name for implicitly created nodes, in qemu's style (#blockNNN)."""
        self._auto += 1
        return f"#block{self._auto:03d}"

    def add_node(self, node: BlockNode) -> BlockNode:
        if not node.node_name:
            node.node_name = self.auto_name()
        if node.node_name in self.nodes:
            raise GraphError(f"Duplicate nodes with node-name='{node.node_name}'")
        self.nodes[node.node_name] = node
        return node

    def lookup(self, name: str) -> BlockNode:
        node = self.nodes.get(name)
        if node is None:
            raise GraphError(f"Cannot find node {name}")
        return node

    def remove_node(self, node: BlockNode) -> None:
        """Take a node out of the graph (it must have no parents); its child links go with it.

        Children left without parents that were created implicitly stay in the graph: as in qemu,
        removal is explicit per node-name.
        """
        self.check_removable(node)
        children = [link.node for link in node.children.values()]
        with Transaction() as tran:
            for link in list(node.children.values()):
                self._unlink(tran, link)
            self.refresh_perms(tran, children)  # the children drop what this node held (and its locks)
        del self.nodes[node.node_name]

    def check_removable(self, node: BlockNode) -> None:
        """Raise GraphError unless :meth:`remove_node` would succeed (so callers can close first)."""
        if node.parents:
            users = ", ".join(link.describe() for link in node.parents)
            raise GraphError(f"Node '{node.node_name}' is busy: in use by {users}")
        frozen = [link for link in node.children.values() if link.frozen]
        if frozen:
            raise FrozenLinkError(f"Cannot remove node '{node.node_name}': {frozen[0].frozen_error()}")

    # -- links ----------------------------------------------------------------------------------

    def attach_child(self, parent: BlockNode, name: str, child: BlockNode, role: Role | None = None) -> ChildLink:
        """Give ``parent`` a child link; the role defaults to what the driver says
        (``parent.child_role``) and the permissions come from ``parent.child_perm``."""
        role = parent.child_role(name) if role is None else role
        if name in parent.children:
            raise GraphError(f"node {parent.node_name!r} already has a {name!r} child")
        if any(n is parent for n in descendants(child)):
            raise GraphError(f"making {child.node_name!r} a child of {parent.node_name!r} would create a cycle")
        check_depth(_depth(parent), child, f"making {child.node_name!r} a child of {parent.node_name!r}")
        link = ChildLink(parent, name, child, role, NONE, ALL)
        with Transaction() as tran:
            self._link(tran, link)
            self.refresh_perms(tran, [parent])
        return link

    def attach_user(self, user: GraphUser, child: BlockNode, perm: Perm, shared: Perm) -> ChildLink:
        """A root user (export, job) starts using ``child`` with the given permissions."""
        check_depth(0, child, f"{user.description} using node {child.node_name!r}")
        link = ChildLink(user, user.name, child, Role(0), perm, shared)
        with Transaction() as tran:
            self._link(tran, link)
            self.refresh_perms(tran, [child])
        return link

    def detach(self, link: ChildLink) -> None:
        if link.frozen:
            raise link.frozen_error()
        with Transaction() as tran:
            self._unlink(tran, link)
            self.refresh_perms(tran, [link.node])

    def set_user_perm(self, link: ChildLink, perm: Perm, shared: Perm) -> None:
        """Change what a root user takes and shares (e.g. an export becoming writable)."""
        old = link.perm, link.shared
        with Transaction() as tran:
            link.perm, link.shared = perm, shared
            tran.add(abort=lambda: _set(link, *old))
            self.refresh_perms(tran, [link.node])

    def replace_child(self, link: ChildLink, new_child: BlockNode, tran: Transaction | None = None) -> None:
        """Re-point one link at another node."""
        if link.frozen:
            raise link.frozen_error()
        if not link.is_root and any(n is link.parent for n in descendants(new_child)):
            raise GraphError(f"re-pointing {link.describe()} to {new_child.node_name!r} would create a cycle")
        parent_depth = _depth(link.parent) if isinstance(link.parent, BlockNode) else 0
        check_depth(parent_depth, new_child, f"re-pointing {link.describe()} to {new_child.node_name!r}")
        with _within(tran) as tran:
            old_child = link.node
            self._repoint(tran, link, new_child)
            self.refresh_perms(tran, [new_child, old_child])

    def set_child(self, tran: Transaction, parent: BlockNode, name: str, child: BlockNode | None) -> None:
        """Attach, re-point or remove ``parent``'s child ``name`` inside ``tran`` (blockdev-reopen).

        The caller refreshes permissions once for everything it changed in the transaction."""
        link = parent.children.get(name)
        if (link.node if link is not None else None) is child:
            return  # already so (including "no such child" asked to stay absent)
        if link is not None and link.frozen:
            raise link.frozen_error()
        if child is not None and any(n is parent for n in descendants(child)):
            raise GraphError(f"making {child.node_name!r} a child of {parent.node_name!r} would create a cycle")
        if child is not None:
            check_depth(_depth(parent), child, f"making {child.node_name!r} a child of {parent.node_name!r}")
        if child is None:
            if link is not None:  # (no link and no child returned above)
                self._unlink(tran, link)
        elif link is None:
            self._link(tran, ChildLink(parent, name, child, parent.child_role(name), NONE, ALL))
        else:
            self._repoint(tran, link, child)

    def replace_node(
        self, old: BlockNode, new: BlockNode, keep: Iterable[ChildLink] = (), tran: Transaction | None = None
    ) -> None:
        """Re-point every parent link of ``old`` at ``new`` (inserting or removing a filter),
        except the links in ``keep`` (e.g. the new filter's own link to ``old``) and links whose
        parent lies below ``new`` (moving those would make a cycle; qemu skips them too: an
        overlay whose backing is the filtered disk keeps reading the disk itself)."""
        keep_ids = {id(link) for link in keep}
        below_new = {id(n) for n in descendants(new)}
        moving = [
            link
            for link in old.parents
            if id(link) not in keep_ids and (link.is_root or id(link.parent) not in below_new)
        ]
        frozen = [link for link in moving if link.frozen]
        if frozen:
            raise frozen[0].frozen_error()
        if moving:
            deepest = max(_depth(link.parent) if isinstance(link.parent, BlockNode) else 0 for link in moving)
            check_depth(deepest, new, f"putting {new.node_name!r} in place of {old.node_name!r}")
        with _within(tran) as tran:
            for link in moving:
                self._repoint(tran, link, new)
            self.refresh_perms(tran, [new, old])

    def insert_filter(
        self, tran: Transaction, filt: BlockNode, below: BlockNode, **others: BlockNode
    ) -> ChildLink:
        """Add ``filt`` (a job's filter) with ``below`` as its ``file`` and ``others`` as further
        children, and move every user of ``below`` to it; all undone if ``tran`` aborts."""
        self.add_node(filt)

        def forget_filter() -> None:
            self.nodes.pop(filt.node_name, None)

        tran.add(abort=forget_filter)
        link = self.attach_child(filt, "file", below)
        tran.add(abort=lambda: self.detach(link))
        for name, child in others.items():
            extra = self.attach_child(filt, name, child)
            tran.add(abort=functools.partial(self.detach, extra))
        self.replace_node(below, filt, keep=[link], tran=tran)
        return link

    def remove_filter(self, filt: BlockNode, below: BlockNode) -> None:
        """Undo :meth:`insert_filter`: users back to ``below`` (if any are left), filter gone."""
        if filt.parents:
            self.replace_node(filt, below)
        for link in list(filt.children.values()):
            self.detach(link)
        self.nodes.pop(filt.node_name, None)

    def detach_user(self, user: GraphUser) -> None:
        """Drop every link of a root user (an export or a job going away)."""
        for link in list(user.links):
            self.detach(link)

    # -- freezing -------------------------------------------------------------------------------

    def freeze_chain(
        self, top: BlockNode, base: BlockNode | None, owner: str, changes: Iterable[ChildLink] = ()
    ) -> list[ChildLink]:
        """Freeze the filter/COW links from ``top`` down to ``base`` for ``owner``
        (:meth:`freeze_links`). Returns the links for :meth:`unfreeze_links`."""
        return self.freeze_links(chain_links(top, base), owner, changes)

    def freeze_links(self, links: list[ChildLink], owner: str, changes: Iterable[ChildLink] = ()) -> list[ChildLink]:
        """Freeze ``links`` for ``owner``, all or none: ``changes`` are those it will change
        itself when it lets go (ChildLink.freeze). Returns the links for :meth:`unfreeze_links`."""
        self.check_freeze(links, owner, changes)
        changing = {id(link) for link in changes}
        for link in links:
            link.freeze(owner, changes=id(link) in changing)
        return list(links)

    def check_freeze(self, links: Iterable[ChildLink], owner: str, changes: Iterable[ChildLink] = ()) -> None:
        """Raise FrozenLinkError unless :meth:`freeze_links` would succeed (changes nothing)."""
        changing = {id(link) for link in changes}
        for link in links:
            self.check_freezable(link)
            link.check_freeze(owner, changes=id(link) in changing)

    @staticmethod
    def check_freezable(link: ChildLink, job_id: str | None = None) -> None:
        """Refuse to freeze a link of another job's filter: that job must be able to remove it."""
        parent = link.parent if isinstance(link.parent, BlockNode) else None
        for node in (link.node, parent):
            owner = node.owner_job if node is not None else None
            if node is not None and owner is not None and owner != job_id:
                raise FrozenLinkError(
                    f"Cannot freeze link {link.describe()}: node '{node.node_name}' is the filter of job '{owner}'"
                )

    @staticmethod
    def unfreeze_links(links: Iterable[ChildLink], owner: str) -> None:
        for link in links:
            link.unfreeze(owner)

    # -- permissions ----------------------------------------------------------------------------

    def refresh_perms(self, tran: Transaction, seeds: Iterable[BlockNode]) -> None:
        """Recompute permissions of ``seeds`` and everything below them, parents before children.

        Raises :class:`PermissionConflict` (the caller's transaction then undoes everything).
        """
        order = _topological([n for seed in seeds for n in descendants(seed)])
        for node in order:
            cumulative, shared = NONE, ALL
            parents = list(node.parents)
            for a in parents:
                for b in parents:
                    if a is not b and b.perm & ~a.shared:
                        missing = Perm(b.perm & ~a.shared)
                        raise PermissionConflict(
                            f"Permission conflict on node '{node.node_name}': permissions "
                            f"'{', '.join(missing.names())}' are both required by {b.describe()} "
                            f"and unshared by {a.describe()}"
                        )
                cumulative |= a.perm
                shared &= a.shared
            if cumulative & (Perm.WRITE | Perm.WRITE_UNCHANGED) and node.read_only:
                writers = [lk for lk in parents if lk.perm & (Perm.WRITE | Perm.WRITE_UNCHANGED)]
                users = ", ".join(lk.describe() for lk in writers)
                raise PermissionConflict(f"Block node '{node.node_name}' is read-only (write wanted by {users})")
            old_node = (node.perm, node.shared)
            node.perm, node.shared = cumulative, shared
            tran.add(abort=functools.partial(_set_node, node, *old_node))
            node.set_perm(tran, cumulative, shared)
            for link in node.children.values():
                old = (link.perm, link.shared)
                link.perm, link.shared = node.child_perm(link, cumulative, shared)
                if link.node.force_share:  # qemu's bdrv_child_perm: a force-share child is shared whole
                    link.shared = ALL
                tran.add(abort=functools.partial(_set, link, *old))

    # -- primitive edits (undoable) -------------------------------------------------------------

    def _link(self, tran: Transaction, link: ChildLink) -> None:
        parent = link.parent
        if isinstance(parent, GraphUser):
            parent.links.append(link)
        else:
            parent.children[link.name] = link
        link.node.parents.append(link)
        tran.add(abort=lambda: self._raw_unlink(link))

    def _unlink(self, tran: Transaction, link: ChildLink) -> None:
        self._raw_unlink(link)
        tran.add(abort=lambda: self._raw_link(link))

    def _repoint(self, tran: Transaction, link: ChildLink, new_child: BlockNode) -> None:
        old_child = link.node
        old_child.parents.remove(link)
        link.node = new_child
        new_child.parents.append(link)

        def undo() -> None:
            new_child.parents.remove(link)
            link.node = old_child
            old_child.parents.append(link)

        tran.add(abort=undo)

    @staticmethod
    def _raw_link(link: ChildLink) -> None:
        parent = link.parent
        if isinstance(parent, GraphUser):
            parent.links.append(link)
        else:
            parent.children[link.name] = link
        link.node.parents.append(link)

    @staticmethod
    def _raw_unlink(link: ChildLink) -> None:
        parent = link.parent
        if isinstance(parent, GraphUser):
            parent.links.remove(link)
        else:
            del parent.children[link.name]
        link.node.parents.remove(link)

    # -- introspection --------------------------------------------------------------------------

    def debug_graph(self, users: Iterable[GraphUser] = ()) -> dict[str, list[dict[str, object]]]:
        """The shape of qemu's ``x-debug-query-block-graph``."""
        ids: dict[int, int] = {}
        nodes: list[dict[str, object]] = []
        edges: list[dict[str, object]] = []

        def node_id(obj: object) -> int:
            if id(obj) not in ids:
                ids[id(obj)] = len(ids) + 1
            return ids[id(obj)]

        for user in users:
            nodes.append({"id": node_id(user), "type": user.kind, "name": user.name})
        for node in self.nodes.values():
            nodes.append({"id": node_id(node), "type": "block-driver", "name": node.node_name})
        owners: list[GraphUser | BlockNode] = [*users, *self.nodes.values()]
        for owner in owners:
            links = owner.links if isinstance(owner, GraphUser) else owner.children.values()
            for link in links:
                edges.append(
                    {
                        "parent": node_id(owner),
                        "child": node_id(link.node),
                        "name": link.name,
                        "perm": link.perm.names(),
                        "shared-perm": link.shared.names(),
                    }
                )
        return {"nodes": nodes, "edges": edges}


@contextlib.contextmanager
def _within(tran: Transaction | None) -> Iterator[Transaction]:
    """The caller's transaction, or a new one that commits or aborts with this block."""
    if tran is not None:
        yield tran
        return
    with Transaction() as own:
        yield own


def _set(link: ChildLink, perm: Perm, shared: Perm) -> None:
    link.perm, link.shared = perm, shared


def _set_node(node: BlockNode, perm: Perm, shared: Perm) -> None:
    node.perm, node.shared = perm, shared


def _parent_name(link: ChildLink) -> str:
    parent = link.parent
    return parent.name if isinstance(parent, GraphUser) else parent.node_name


def _topological(nodes: list[BlockNode]) -> list[BlockNode]:
    """Order ``nodes`` so every parent comes before its children (restricted to the set)."""
    members = {id(n): n for n in nodes}
    indegree = {key: 0 for key in members}
    for node in members.values():
        for link in node.children.values():
            if id(link.node) in members:
                indegree[id(link.node)] += 1
    ready = [n for key, n in members.items() if indegree[key] == 0]
    order = []
    while ready:
        node = ready.pop()
        order.append(node)
        for link in node.children.values():
            key = id(link.node)
            if key in members:
                indegree[key] -= 1
                if indegree[key] == 0:
                    ready.append(link.node)
    if len(order) != len(members):
        raise GraphError("the block graph has a cycle")
    return order
