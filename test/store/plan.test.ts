/**
 * The delete/gc planner on literal views: which layers are merged, removed, kept and why.
 * The chain of every scenario: the user's image B, the frozen layers O1…O4 of snapshots
 * S2…S5 (S1's top is B itself), and the live overlay O5 that the running VM (QEMU 100) writes.
 */
import { describe, expect, it } from 'vitest';
import type { Holder } from '../../src/store/facts.js';
import { planCollection } from '../../src/store/plan.js';
import type { SnapshotEntry } from '../../src/store/schema.js';
import type { LayerView, QemuView, SnapshotView, StoreView } from '../../src/store/view.js';

/** Ids differ from names, as in a real catalog. */
const idOf = (name: string) => `id-of-${name}`;
const q = (pid: number, comm = 'qemu-system-x86'): Holder => ({ pid, startTime: `${pid}0`, comm });
const LIVE = q(100);

interface Scenario {
  layers: Record<string, Partial<LayerView> & { backing?: string }>;
  snapshots: Record<string, string>;
  holders?: Record<number, string[]>;
}

function view(s: Scenario): StoreView {
  const holders = new Map<string, Holder[]>();
  for (const [pid, paths] of Object.entries(s.holders ?? {}))
    for (const p of paths) holders.set(p, [...(holders.get(p) ?? []), q(Number(pid))]);
  const layers = new Map<string, LayerView>();
  for (const [path, l] of Object.entries(s.layers)) {
    layers.set(path, {
      path,
      exists: true,
      backing: undefined,
      origin: 'snapshot',
      active: false,
      vm: 'vm1',
      state: 'ok',
      bytes: 1,
      ...l,
      holders: holders.get(path) ?? [],
    });
  }
  const snapshots = new Map<string, SnapshotView>();
  for (const [name, top] of Object.entries(s.snapshots)) {
    const entry = { name, id: idOf(name), disks: [{ device: 'disk0', top }] } as SnapshotEntry;
    snapshots.set(idOf(name), {
      entry,
      chains: [],
      state: 'ok',
      file: `/store/${name}.qsnap`,
      fileHolders: [],
      fileBytes: 1,
    });
  }
  const qemus: QemuView[] = Object.entries(s.holders ?? {}).map(([pid, paths]) => {
    const below = new Set(paths.map((p) => layers.get(p)?.backing));
    return { holder: q(Number(pid)), vm: undefined, tops: paths.filter((p) => !below.has(p)) };
  });
  return { layers, snapshots, qemus, garbage: [] };
}

const CHAIN = {
  B: { origin: 'user' as const },
  O1: { backing: 'B' },
  O2: { backing: 'O1' },
  O3: { backing: 'O2' },
  O4: { backing: 'O3' },
  O5: { backing: 'O4', active: true },
};
const FIVE = { S1: 'B', S2: 'O1', S3: 'O2', S4: 'O3', S5: 'O4' };
const RUNNING = { 100: ['O5', 'O4', 'O3', 'O2', 'O1', 'B'] };
const plan = (s: Scenario, deleting: string[], blocked?: string) =>
  planCollection(view(s), { deleting: new Set(deleting.map(idOf)), liveMergeBlocked: () => blocked });

describe('delete planning', () => {
  it('a middle snapshot: its layer is merged into the next one by the running VM, then removed', () => {
    const p = plan({ layers: CHAIN, snapshots: FIVE, holders: RUNNING }, ['S3']);
    expect(p.merges).toEqual([
      {
        into: 'O3',
        layers: ['O2'],
        newBacking: 'O1',
        via: { kind: 'live', qemu: expect.objectContaining({ holder: LIVE }) },
      },
    ]);
    expect(p.remove.map((f) => f.path)).toEqual(['O2', '/store/S3.qsnap']);
    // O2 goes only once the merge has taken its data up (if the merge fails, it stays).
    expect(p.remove.map((f) => f.afterMerge)).toEqual([true, undefined]);
    expect(p.wait).toEqual([]);
  });

  it('the oldest, whose frozen layer is the user’s own image: the image stays, untouched', () => {
    const p = plan({ layers: CHAIN, snapshots: FIVE, holders: RUNNING }, ['S1']);
    expect(p.merges).toEqual([]);
    expect(p.remove.map((f) => f.path)).toEqual(['/store/S1.qsnap']);
    expect(p.keep).toEqual([{ path: 'B', kind: 'layer', reason: 'not made by qsnap' }]);
  });

  it('the newest: its layer is streamed into the live overlay', () => {
    const p = plan({ layers: CHAIN, snapshots: FIVE, holders: RUNNING }, ['S5']);
    expect(p.merges.map((m) => [m.into, m.layers, m.newBacking, m.via.kind])).toEqual([
      ['O5', ['O4'], 'O3', 'live'],
    ]);
    expect(p.remove.map((f) => f.path)).toContain('O4');
  });

  it('two adjacent snapshots: one merge carries both layers', () => {
    const p = plan({ layers: CHAIN, snapshots: FIVE, holders: RUNNING }, ['S2', 'S3']);
    expect(p.merges.map((m) => [m.into, m.layers, m.newBacking])).toEqual([['O3', ['O2', 'O1'], 'B']]);
  });

  it('every snapshot: the VM ends on its live overlay over the user’s image, nothing of the user’s touched', () => {
    const p = plan({ layers: CHAIN, snapshots: FIVE, holders: RUNNING }, Object.keys(FIVE));
    expect(p.merges.map((m) => [m.into, m.layers, m.newBacking])).toEqual([
      ['O5', ['O4', 'O3', 'O2', 'O1'], 'B'],
    ]);
    expect(p.remove.map((f) => f.path).filter((f) => !f.endsWith('.qsnap'))).toEqual([
      'O1',
      'O2',
      'O3',
      'O4',
    ]);
    expect(p.remove.map((f) => f.path)).not.toContain('B');
  });

  it('the VM is not running: the merge is offline (qemu-img), and its live overlay is its latest disk state', () => {
    const p = plan({ layers: CHAIN, snapshots: FIVE }, ['S3', 'S5']);
    expect(p.merges.map((m) => [m.into, m.layers, m.via.kind])).toEqual([
      ['O3', ['O2'], 'offline'],
      ['O5', ['O4'], 'offline'],
    ]);
    expect(p.remove.map((f) => f.path)).not.toContain('O5');
  });

  it('a layer held by a running restored VM survives: kept, and the plan says by whom', () => {
    const layers = { ...CHAIN, R: { backing: 'O3', origin: 'restore' as const, active: true } };
    const holders = { ...RUNNING, 200: ['R', 'O3', 'O2', 'O1', 'B'] };
    const p = plan({ layers, snapshots: FIVE, holders }, ['S4']);
    expect(p.keep).toEqual([
      { path: 'O3', kind: 'layer', reason: 'held by the restored VM (qemu-system-x86 pid 200)' },
    ]);
    expect(p.remove.map((f) => f.path)).not.toContain('O3');
    expect(p.remove.map((f) => f.path)).not.toContain('R');
  });

  it('a layer below one that two QEMUs hold open is kept (QEMU could not take its write lock)', () => {
    const layers = { ...CHAIN, R: { backing: 'O3', origin: 'restore' as const, active: true } };
    const holders = { ...RUNNING, 200: ['R', 'O3', 'O2', 'O1', 'B'] };
    const p = plan({ layers, snapshots: FIVE, holders }, ['S3']);
    expect(p.merges).toEqual([]);
    expect(p.keep[0]).toMatchObject({
      path: 'O2',
      reason: expect.stringMatching(/O3, which .*pid 100.*pid 200 hold open/),
    });
  });

  it('a VM whose QMP socket is busy: no live merge, the layer is kept', () => {
    const p = plan(
      { layers: CHAIN, snapshots: FIVE, holders: RUNNING },
      ['S3'],
      'its QMP socket is not reachable',
    );
    expect(p.merges).toEqual([]);
    expect(p.keep[0]).toMatchObject({ path: 'O2', reason: expect.stringMatching(/not reachable/) });
  });

  it('a lazily restored VM maps the snapshot file: the file waits for gc', () => {
    const v = view({ layers: CHAIN, snapshots: FIVE, holders: RUNNING });
    v.snapshots.get(idOf('S3'))!.fileHolders = [q(300)];
    const p = planCollection(v, { deleting: new Set([idOf('S3')]), liveMergeBlocked: () => undefined });
    expect(p.wait.map((f) => f.path)).toEqual(['/store/S3.qsnap']);
  });
});

describe('gc planning (nothing deleted)', () => {
  it('finishes a delete that was cut short: an entry marked deleting goes, by its id', () => {
    const v = view({ layers: CHAIN, snapshots: FIVE, holders: RUNNING });
    v.snapshots.get(idOf('S3'))!.entry.deleting = true;
    const p = planCollection(v, { deleting: new Set(), liveMergeBlocked: () => undefined });
    expect(p.snapshots).toEqual([idOf('S3')]);
    expect(p.merges.map((m) => [m.into, m.layers])).toEqual([['O3', ['O2']]]);
  });

  it('removes the restore overlay of a VM that stopped, never a snapshot’s layer', () => {
    const layers = { ...CHAIN, R: { backing: 'O3', origin: 'restore' as const, active: true } };
    const p = plan({ layers, snapshots: FIVE, holders: RUNNING }, []);
    expect(p.remove).toEqual([
      { path: 'R', kind: 'layer', reason: 'restore overlay of a VM that is not running' },
    ]);
    expect(p.merges).toEqual([]);
  });

  it('merges a layer whose snapshot is gone once what held it has stopped', () => {
    const layers = { ...CHAIN };
    const snapshots: Record<string, string> = { ...FIVE };
    delete snapshots['S3'];
    const p = plan({ layers, snapshots, holders: RUNNING }, []);
    expect(p.merges.map((m) => [m.into, m.layers])).toEqual([['O3', ['O2']]]);
  });

  it('a missing layer with an unknown backing file: nothing at all is removed', () => {
    const layers = { ...CHAIN, O2: { exists: false } };
    const p = plan({ layers, snapshots: { S5: 'O4' }, holders: {} }, []);
    expect(p.remove).toEqual([]);
    expect(p.keep.map((k) => k.path).sort()).toEqual(['O1', 'O3']);
    // Negative control: the same store with the chain intact does remove what nothing needs.
    const intact = plan({ layers: CHAIN, snapshots: { S5: 'O4' }, holders: {} }, []);
    expect(intact.merges.map((m) => [m.into, m.layers])).toEqual([['O4', ['O3', 'O2', 'O1']]]);
  });

  it('never removes or merges what is missing or not made by qsnap', () => {
    const layers = {
      ...CHAIN,
      O2: { backing: 'O1', exists: false },
      U: { backing: 'O4', origin: 'unknown' as const },
    };
    const p = plan({ layers, snapshots: { S5: 'O4' }, holders: {} }, []);
    expect(p.remove.map((f) => f.path)).toEqual([]);
    expect(p.merges).toEqual([]);
    expect(p.keep).toEqual([
      {
        path: 'O3',
        kind: 'layer',
        reason: 'the chain below O4 is broken (O2 is missing): nothing is merged',
      },
    ]);
  });
});

describe('the catalog after files went away', () => {
  it('forgets a layer that is gone and that nothing references, never one a snapshot still names', () => {
    const layers = { ...CHAIN, X: { backing: 'B', exists: false }, O2: { backing: 'O1', exists: false } };
    const p = plan({ layers, snapshots: FIVE, holders: {} }, []);
    expect(p.forget).toEqual(['X']);
  });
});
