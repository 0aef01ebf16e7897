import type { Catalog, SnapshotEntry } from './schema.js';
import type { Store } from './store.js';
import { chainOf, type StoreView } from './view.js';

export interface SnapshotRow {
  name: string;
  id: string;
  /** The VM: its QEMU -name, else its QMP socket. */
  vm: string;
  createdAt: string;
  /** The snapshot this one's disks build on (the nearest snapshot top below its own), or null. */
  parent: string | null;
  ramBytes: number;
  downtimeMs: number;
  /** On disk: the snapshot file, the layers only it holds (what deleting it frees), both. */
  bytes: { file: number; layers: number; total: number };
  /** 'ok', or what is missing or changed. */
  state: string;
  cmdline: 'recorded' | 'given' | 'imported' | 'none';
  disks: { device: string; top: string; chain: number }[];
}

/** Every snapshot of the store, oldest first. */
export async function listSnapshots(store: Store): Promise<SnapshotRow[]> {
  const catalog = await store.read();
  return rowsOf(catalog, await store.view(catalog));
}

export function rowsOf(catalog: Catalog, view: StoreView): SnapshotRow[] {
  const live = [...view.snapshots.values()].filter((s) => !s.entry.deleting);
  const tops = new Map(live.flatMap((s) => s.entry.disks.map((d) => [d.top, s.entry.name] as const)));
  const usage = layerUsage(
    view,
    live.map((s) => s.entry),
  );
  return live
    .map((s): SnapshotRow => {
      const exclusive = s.chains.flat().filter((p) => usage.get(p) === s.entry.id);
      const layers = exclusive.reduce((sum, p) => sum + (view.layers.get(p)?.bytes ?? 0), 0);
      return {
        name: s.entry.name,
        id: s.entry.id,
        vm: vmLabel(catalog, s.entry.vm),
        createdAt: s.entry.createdAt,
        parent: parentOf(s.chains[0] ?? [], tops),
        ramBytes: s.entry.ramBytes,
        downtimeMs: s.entry.downtimeMs,
        bytes: { file: s.fileBytes, layers, total: s.fileBytes + layers },
        state: s.state,
        cmdline: s.entry.cmdline?.source ?? 'none',
        disks: s.entry.disks.map((d) => ({
          device: d.device,
          top: d.top,
          chain: chainOf(d.top, view.layers).length,
        })),
      };
    })
    .sort((a, b) => a.createdAt.localeCompare(b.createdAt));
}

/**
 * For each qsnap layer: the one snapshot that alone needs it, or '' when several snapshots, a
 * running QEMU or the user need it (then deleting one snapshot does not free it).
 */
function layerUsage(view: StoreView, entries: SnapshotEntry[]): Map<string, string> {
  const usage = new Map<string, string>();
  for (const q of view.qemus)
    for (const top of q.tops) for (const p of chainOf(top, view.layers)) usage.set(p, '');
  for (const e of entries)
    for (const d of e.disks)
      for (const p of chainOf(d.top, view.layers)) {
        const layer = view.layers.get(p);
        if (!layer || layer.origin === 'user' || layer.origin === 'unknown') usage.set(p, '');
        else usage.set(p, usage.has(p) && usage.get(p) !== e.id ? '' : e.id);
      }
  return usage;
}

function parentOf(chain: string[], tops: Map<string, string>): string | null {
  for (const path of chain.slice(1)) {
    const name = tops.get(path);
    if (name) return name;
  }
  return null;
}

function vmLabel(catalog: Catalog, key: string): string {
  const vm = catalog.vms[key];
  return vm?.name ?? vm?.qmp ?? key;
}

/** The parent tree as text lines: roots first, children indented under their parent. */
export function drawTree(rows: SnapshotRow[]): string[] {
  const children = new Map<string | null, SnapshotRow[]>();
  for (const row of rows) children.set(row.parent, [...(children.get(row.parent) ?? []), row]);
  const lines: string[] = [];
  const walk = (parent: string | null, prefix: string) => {
    const kids = children.get(parent) ?? [];
    kids.forEach((row, i) => {
      const last = i === kids.length - 1;
      lines.push(
        `${prefix}${parent === null ? '' : last ? '└── ' : '├── '}${row.name}${row.state === 'ok' ? '' : `  [${row.state}]`}`,
      );
      walk(row.name, parent === null ? prefix : `${prefix}${last ? '    ' : '│   '}`);
    });
  };
  walk(null, '');
  return lines;
}
