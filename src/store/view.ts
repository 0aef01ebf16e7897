import { readImage } from '../vm/image-chain.js';
import {
  allocatedBytes,
  fileKey,
  type Holder,
  type HolderMap,
  identityOf,
  sameIdentity,
  scanHolders,
} from './facts.js';
import type { Catalog, LayerEntry, SnapshotEntry, VmEntry } from './schema.js';

/**
 * The store as it is now: the catalog joined with the facts — each layer's backing file from
 * its header, whether it is still the file that froze, who holds it open. Built fresh for
 * every command; planning (plan.ts) works on this view only.
 */

export type LayerState = 'ok' | 'missing' | 'changed';

export interface LayerView {
  path: string;
  exists: boolean;
  backing: string | undefined;
  /** qsnap made it (only such layers are ever merged into or removed); 'unknown': not in the catalog. */
  origin: LayerEntry['origin'] | 'unknown';
  /** Live or restore overlay still being written (no identity recorded yet). */
  active: boolean;
  vm: string | undefined;
  state: LayerState;
  holders: Holder[];
  bytes: number;
}

export interface SnapshotView {
  entry: SnapshotEntry;
  /** Per disk: its top and the images below it. */
  chains: string[][];
  /** 'ok', or what is wrong ('missing <path>', 'changed <path>'). */
  state: string;
  file: string;
  fileHolders: Holder[];
  fileBytes: number;
}

/** A process holding layers: a QEMU, with the VM the catalog knows it as (by pid and start time). */
export interface QemuView {
  holder: Holder;
  vm: VmEntry | undefined;
  /** The layers it writes to: held by it and below none of its other held layers. */
  tops: string[];
}

/** A file the catalog keeps as garbage: to be removed once nothing holds it. */
export interface GarbageView {
  path: string;
  reason: string;
  exists: boolean;
  holders: Holder[];
}

export interface StoreView {
  layers: Map<string, LayerView>;
  /** By snapshot id. */
  snapshots: Map<string, SnapshotView>;
  qemus: QemuView[];
  garbage: GarbageView[];
}

export async function viewStore(
  catalog: Catalog,
  snapshotFile: (e: SnapshotEntry) => string,
): Promise<StoreView> {
  const holders = await scanHolders();
  const layers = new Map<string, LayerView>();
  const visit = async (path: string | undefined): Promise<void> => {
    for (let p = path; p !== undefined && !layers.has(p); p = layers.get(p)?.backing) {
      layers.set(p, await layerView(p, catalog.layers[p], holders));
    }
  };
  for (const entry of Object.values(catalog.snapshots)) for (const d of entry.disks) await visit(d.top);
  for (const path of Object.keys(catalog.layers)) await visit(path);
  const snapshots = new Map<string, SnapshotView>();
  for (const entry of Object.values(catalog.snapshots)) {
    snapshots.set(entry.id, await snapshotView(entry, snapshotFile(entry), layers, holders));
  }
  const garbage = await Promise.all(catalog.garbage.map((g) => garbageView(g.path, g.reason, holders)));
  return { layers, snapshots, qemus: qemusOf(layers, catalog), garbage };
}

async function garbageView(path: string, reason: string, holders: HolderMap): Promise<GarbageView> {
  const key = await fileKey(path);
  return { path, reason, exists: key !== undefined, holders: (key && holders.get(key)) || [] };
}

async function layerView(
  path: string,
  entry: LayerEntry | undefined,
  holders: HolderMap,
): Promise<LayerView> {
  const image = await readImage(path).catch(() => undefined);
  const identity = image ? await identityOf(path) : undefined;
  const key = image ? await fileKey(path) : undefined;
  const changed =
    entry?.identity !== undefined && identity !== undefined && !sameIdentity(entry.identity, identity);
  return {
    path,
    exists: image !== undefined,
    // A missing file's header cannot be read: its chain continues where it was when it froze.
    backing: image ? image.backing : entry?.backing,
    origin: entry?.origin ?? 'unknown',
    active: entry !== undefined && entry.identity === undefined && entry.origin !== 'user',
    vm: entry?.vm,
    state: image === undefined ? 'missing' : changed ? 'changed' : 'ok',
    holders: (key && holders.get(key)) || [],
    bytes: image ? await allocatedBytes(path) : 0,
  };
}

async function snapshotView(
  entry: SnapshotEntry,
  file: string,
  layers: Map<string, LayerView>,
  holders: HolderMap,
): Promise<SnapshotView> {
  const chains = entry.disks.map((d) => chainOf(d.top, layers));
  const problems: string[] = [];
  for (const chain of chains)
    for (const path of chain) {
      const layer = layers.get(path);
      if (layer && layer.state !== 'ok') problems.push(`${layer.state} ${path}`);
    }
  const key = await fileKey(file);
  if (!key) problems.unshift(`missing ${file}`);
  return {
    entry,
    chains,
    state: problems.length ? problems.join('; ') : 'ok',
    file,
    fileHolders: (key && holders.get(key)) || [],
    fileBytes: await allocatedBytes(file),
  };
}

/** A layer and the layers below it, as far as the view knows them. */
export function chainOf(top: string, layers: Map<string, LayerView>): string[] {
  const chain: string[] = [];
  for (let p: string | undefined = top; p !== undefined && !chain.includes(p); p = layers.get(p)?.backing)
    chain.push(p);
  return chain;
}

function qemusOf(layers: Map<string, LayerView>, catalog: Catalog): QemuView[] {
  const byPid = new Map<number, { holder: Holder; held: string[] }>();
  for (const layer of layers.values())
    for (const holder of layer.holders) {
      const q = byPid.get(holder.pid) ?? { holder, held: [] };
      q.held.push(layer.path);
      byPid.set(holder.pid, q);
    }
  const vms = Object.values(catalog.vms);
  return [...byPid.values()].map(({ holder, held }) => {
    const below = new Set(held.map((p) => layers.get(p)?.backing).filter((b) => b !== undefined));
    return {
      holder,
      vm: vms.find((v) => v.pid === holder.pid && v.startTime === holder.startTime),
      tops: held.filter((p) => !below.has(p)),
    };
  });
}
