import type { Holder } from './facts.js';
import type { LayerView, QemuView, StoreView } from './view.js';

/**
 * What a delete or a garbage collection will do, decided on the view alone (pure: the tests
 * feed it literal views). The rule that keeps every snapshot and every running VM intact:
 *
 * - Keepers: the top layer of every remaining snapshot, every layer a process writes to (the
 *   top of what a QEMU holds), every file qsnap did not make, and the live overlay of a VM
 *   that exited (it holds that VM's latest disk state).
 * - A layer qsnap made that is no keeper but lies below one is an intermediate: it exists only
 *   to carry data for the keepers above it. Its data is merged into the keeper right above the
 *   run of such layers (a live block-stream by the one QEMU that holds that keeper, or
 *   `qemu-img rebase` when nothing holds it) — or, when that cannot be done safely, the run is
 *   kept and the plan says who holds it.
 * - What then lies in no keeper's chain is removed — unless a process still has it open, then
 *   it waits (garbage) for a later `qsnap gc`.
 */

export type MergeVia = { kind: 'live'; qemu: QemuView } | { kind: 'offline' };

export interface Merge {
  /** The keeper that takes the data in. */
  into: string;
  /** The layers merged into it, top first; afterwards `into` backs onto `newBacking`. */
  layers: string[];
  newBacking: string | undefined;
  via: MergeVia;
}

export interface PlannedFile {
  path: string;
  kind: 'layer' | 'snapshot-file';
  reason: string;
  /** It goes only once a planned merge took its data up: while the merge has not happened, it stays. */
  afterMerge?: true;
}

export interface Plan {
  /** Ids of the snapshots whose entries go. */
  snapshots: string[];
  merges: Merge[];
  remove: PlannedFile[];
  /** Files that would go but are held open: removed by a later gc. */
  wait: (PlannedFile & { holders: Holder[] })[];
  /** Layers that stay although their snapshot is gone, and why. */
  keep: PlannedFile[];
  /** Catalog entries of files that are gone and that nothing references: forgotten. */
  forget: string[];
}

export interface PlanOptions {
  /** Ids of the snapshots to delete (entries already marked deleting are added). */
  deleting: ReadonlySet<string>;
  /** Why this QEMU cannot run a live merge now (its QMP socket is busy, its disks are inactive), or undefined. */
  liveMergeBlocked: (qemu: QemuView) => string | undefined;
}

export function planCollection(view: StoreView, options: PlanOptions): Plan {
  const deleting = new Set([
    ...options.deleting,
    ...[...view.snapshots.values()].filter((s) => s.entry.deleting).map((s) => s.entry.id),
  ]);
  const keepers = findKeepers(view, deleting);
  const plan: Plan = { snapshots: [...deleting], merges: [], remove: [], wait: [], keep: [], forget: [] };
  const blocked = new Map<string, string>();
  for (const [path] of keepers) planMergeInto(view, path, keepers, options, plan, blocked);
  const reachable = {
    after: reachableAfter(view, keepers, plan.merges),
    now: reachableAfter(view, keepers, []),
  };
  const releasedBy = releasedByMerges(plan.merges);
  const lost = lostTrail(view, keepers);
  for (const layer of view.layers.values()) {
    if (lost) blocked.set(layer.path, `nothing is removed while the chain below ${lost} cannot be followed`);
    planLayer(layer, keepers, blocked, reachable, releasedBy, plan);
  }
  for (const id of deleting) {
    const s = view.snapshots.get(id);
    if (!s) continue;
    planFile(plan, s.file, 'snapshot-file', `file of snapshot ${s.entry.name}`, s.fileHolders);
    for (const d of s.entry.disks) {
      const reason = keepers.get(d.top);
      if (reason && !plan.keep.some((k) => k.path === d.top))
        plan.keep.push({ path: d.top, kind: 'layer', reason });
    }
  }
  // A garbage file that some chain reads (it should never be) stays: the chains decide, not the list.
  for (const g of view.garbage)
    if (g.exists && !reachable.now.has(g.path)) planFile(plan, g.path, 'snapshot-file', g.reason, g.holders);
  return plan;
}

/** A live merge makes its QEMU let go of the merged layers: that QEMU does not hold them afterwards. */
function releasedByMerges(merges: Merge[]): Map<string, number> {
  const released = new Map<string, number>();
  for (const m of merges)
    if (m.via.kind === 'live') for (const path of m.layers) released.set(path, m.via.qemu.holder.pid);
  return released;
}

/** Keepers and why each is one. */
function findKeepers(view: StoreView, deleting: Set<string>): Map<string, string> {
  const keepers = new Map<string, string>();
  for (const s of view.snapshots.values()) {
    if (deleting.has(s.entry.id)) continue;
    for (const d of s.entry.disks) keepers.set(d.top, `top of snapshot ${s.entry.name}`);
  }
  for (const q of view.qemus) for (const top of q.tops) keepers.set(top, `written by ${who(q.holder)}`);
  for (const layer of view.layers.values()) {
    if (!layer.exists || keepers.has(layer.path)) continue;
    if (layer.origin === 'user' || layer.origin === 'unknown') keepers.set(layer.path, 'not made by qsnap');
    else if (layer.active && layer.origin === 'snapshot' && layer.holders.length === 0)
      keepers.set(layer.path, `latest disk state of VM ${layer.vm ?? '?'} (not running)`);
  }
  return keepers;
}

function mergeable(layer: LayerView | undefined, keepers: Map<string, string>): layer is LayerView {
  return (
    layer?.exists === true &&
    layer.origin !== 'user' &&
    layer.origin !== 'unknown' &&
    !keepers.has(layer.path)
  );
}

function planMergeInto(
  view: StoreView,
  into: string,
  keepers: Map<string, string>,
  options: PlanOptions,
  plan: Plan,
  blocked: Map<string, string>,
): void {
  const keeper = view.layers.get(into);
  if (!keeper?.exists) return;
  const run: string[] = [];
  let below = view.layers.get(keeper.backing ?? '');
  for (; mergeable(below, keepers); below = view.layers.get(below.backing ?? '')) run.push(below.path);
  if (run.length === 0) return;
  const broken = brokenBelow(view, keeper);
  const via = broken
    ? `the chain below ${keeper.path} is broken (${broken} is missing): nothing is merged`
    : mergeRoute(view, keeper, options);
  if (typeof via === 'string') for (const path of run) blocked.set(path, via);
  else plan.merges.push({ into, layers: run, newBacking: view.layers.get(run.at(-1)!)?.backing, via });
}

/**
 * A missing layer whose backing file nobody recorded: what lies below it cannot be known, so
 * no layer may be taken for unneeded (it might be needed below the missing one).
 */
function lostTrail(view: StoreView, keepers: Map<string, string>): string | undefined {
  for (const [top] of keepers)
    for (let p: string | undefined = top, n = 0; p !== undefined && n < 1000; n++) {
      const layer = view.layers.get(p);
      if (layer && !layer.exists && layer.backing === undefined && layer.origin !== 'user') return p;
      p = layer?.backing;
    }
  return undefined;
}

/** The first missing layer below `keeper`, when its chain is broken. */
function brokenBelow(view: StoreView, keeper: LayerView): string | undefined {
  const seen = new Set<string>();
  for (let p = keeper.backing; p !== undefined && !seen.has(p); p = view.layers.get(p)?.backing) {
    seen.add(p);
    if (!view.layers.get(p)?.exists) return p;
  }
  return undefined;
}

/** How `keeper` can take data in: by the one QEMU holding it, offline, or not at all (the reason). */
function mergeRoute(view: StoreView, keeper: LayerView, options: PlanOptions): MergeVia | string {
  if (keeper.origin === 'user' || keeper.origin === 'unknown')
    return `needed below ${keeper.path}, which qsnap did not make`;
  if (keeper.holders.length === 0) return { kind: 'offline' };
  const names = keeper.holders.map(who).join(', ');
  if (keeper.origin === 'restore') return `held by the restored VM (${names})`;
  if (keeper.holders.length > 1) return `needed below ${keeper.path}, which ${names} hold open`;
  const qemu = view.qemus.find((q) => q.holder.pid === keeper.holders[0]!.pid);
  const blocked = qemu ? options.liveMergeBlocked(qemu) : 'qsnap does not know its QMP socket';
  if (!qemu || blocked) return `needed below ${keeper.path}, held by ${names} (${blocked})`;
  return { kind: 'live', qemu };
}

/** Layers still in some keeper's chain once the merges are done. */
function reachableAfter(view: StoreView, keepers: Map<string, string>, merges: Merge[]): Set<string> {
  const newBacking = new Map(merges.map((m) => [m.into, m.newBacking]));
  const seen = new Set<string>();
  for (const [top] of keepers) {
    for (let p: string | undefined = top; p !== undefined && !seen.has(p); ) {
      seen.add(p);
      p = newBacking.has(p) ? newBacking.get(p) : view.layers.get(p)?.backing;
    }
  }
  return seen;
}

function planLayer(
  layer: LayerView,
  keepers: Map<string, string>,
  blocked: Map<string, string>,
  reachable: { after: Set<string>; now: Set<string> },
  releasedBy: Map<string, number>,
  plan: Plan,
): void {
  if (!layer.exists && !reachable.now.has(layer.path) && layer.origin !== 'unknown')
    plan.forget.push(layer.path);
  if (!layer.exists || keepers.has(layer.path) || layer.origin === 'user' || layer.origin === 'unknown')
    return;
  const why = blocked.get(layer.path);
  if (why) plan.keep.push({ path: layer.path, kind: 'layer', reason: why });
  else if (!reachable.after.has(layer.path)) {
    const merger = releasedBy.get(layer.path);
    const holders = layer.holders.filter((h) => h.pid !== merger);
    const afterMerge = reachable.now.has(layer.path);
    planFile(
      plan,
      layer.path,
      'layer',
      afterMerge ? 'merged into the layer above it' : reasonGone(layer),
      holders,
      afterMerge,
    );
  }
}

function reasonGone(layer: LayerView): string {
  if (layer.origin === 'restore') return 'restore overlay of a VM that is not running';
  return layer.active ? 'overlay nothing uses' : 'no snapshot or VM needs it';
}

function planFile(
  plan: Plan,
  path: string,
  kind: PlannedFile['kind'],
  reason: string,
  holders: Holder[],
  afterMerge = false,
): void {
  const after = afterMerge ? { afterMerge: true as const } : {};
  if (holders.length) plan.wait.push({ path, kind, reason, holders, ...after });
  else plan.remove.push({ path, kind, reason, ...after });
}

export function who(h: Holder): string {
  return `${h.comm} pid ${h.pid}`;
}
