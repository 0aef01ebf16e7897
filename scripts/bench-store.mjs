#!/usr/bin/env node
// `make bench-store`: the snapshot store's figures.
//   list    `qsnap list` (the CLI, a new process each time) and listSnapshots() with N snapshots
//           of one VM: a chain of N qcow2 layers and N snapshot files, catalogued — what list
//           reads is the same as for real snapshots (every layer's header, every file's stat, who
//           holds what in /proc); the snapshot files are small, list never opens them.
//   merge   a busy test guest (its workload rewriting memory and its disk ring), three snapshots
//           into a store, then the middle one deleted: the live block-stream's time, the bytes it
//           copied into the layer above, and the guest's pause while QEMU merged (QMP STOP events).
//
//   node scripts/bench-store.mjs [--snapshots 100] [--runs 5] [--quick] [--json]
import { execFileSync, spawnSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

const { values } = parseArgs({
  options: {
    snapshots: { type: 'string', default: '100' },
    runs: { type: 'string', default: '5' },
    quick: { type: 'boolean', default: false },
    json: { type: 'boolean', default: false },
  },
});
const count = values.quick ? 20 : Number(values.snapshots);
const runs = values.quick ? 2 : Number(values.runs);
const log = (line) => process.stderr.write(`${line}\n`);
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)];
const cli = new URL('../dist/cli/main.js', import.meta.url).pathname;

async function listBench(work) {
  const { Store } = await import('../dist/store/store.js');
  const { listSnapshots } = await import('../dist/store/list.js');
  const { identityOf } = await import('../dist/store/facts.js');
  const dir = join(work, 'list');
  const disks = join(dir, 'disks');
  await mkdir(disks, { recursive: true });
  const store = await Store.open({ dir: join(dir, 'store'), stateDir: join(dir, 'state') });
  const layers = [];
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', join(disks, 'base.qcow2'), '1G']);
  let below = join(disks, 'base.qcow2');
  for (let i = 0; i < count; i++) {
    const layer = join(disks, `layer${i}.qcow2`);
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', below, '-F', 'qcow2', layer]);
    layers.push(below);
    below = layer;
  }
  await store.transact('bench', async (c) => {
    for (const [i, top] of layers.entries()) {
      const id = randomUUID();
      await writeFile(join(store.snapshotsDir, `${id}.qsnap`), Buffer.alloc(4096, 1));
      c.snapshots[id] = {
        name: `s${i}`,
        id,
        file: `${id}.qsnap`,
        createdAt: new Date(Date.now() + i).toISOString(),
        vm: 'bench',
        ramBytes: 2 ** 28,
        allocatedBytes: 4096,
        downtimeMs: 10,
        strategy: 'background-snapshot',
        machine: 'pc-i440fx-7.2',
        qemuVersion: '7.2.0',
        disks: [{ device: 'disk0', top }],
      };
      c.layers[top] = {
        path: top,
        origin: i === 0 ? 'user' : 'snapshot',
        createdAt: new Date().toISOString(),
        identity: await identityOf(top),
      };
    }
  });
  const inProcess = [];
  const command = [];
  for (let r = 0; r < runs; r++) {
    let t = performance.now();
    const rows = await listSnapshots(store);
    inProcess.push(performance.now() - t);
    if (rows.length !== count) throw new Error(`listed ${rows.length} of ${count}`);
    t = performance.now();
    const p = spawnSync(process.execPath, [cli, 'list', '--json', '--store', store.dir], {
      encoding: 'utf8',
      maxBuffer: 64 * 2 ** 20,
    });
    command.push(performance.now() - t);
    if (p.status !== 0) throw new Error(p.stderr);
  }
  const version = spawnSync(process.execPath, [cli, '--version'], { encoding: 'utf8' });
  const t = performance.now();
  spawnSync(process.execPath, [cli, '--version']);
  const startup = performance.now() - t;
  return {
    snapshots: count,
    listMs: median(inProcess),
    commandMs: median(command),
    nodeStartupMs: startup,
    version: version.stdout.trim(),
  };
}

async function mergeBench(work) {
  const { bootTestGuest } = await import('../dist/guest/test-guest.js');
  const { Store } = await import('../dist/store/store.js');
  const { storeSnapshot } = await import('../dist/store/snapshot.js');
  const { collect } = await import('../dist/store/collect.js');
  const results = [];
  for (let r = 0; r < runs; r++) {
    const dir = await mkdtemp(join(work, 'merge-'));
    const guest = await bootTestGuest({ dir });
    try {
      const store = await Store.open({ dir: join(dir, 'store'), stateDir: join(dir, 'state') });
      for (const name of ['a', 'b', 'c']) {
        await storeSnapshot(store, { qmp: guest.vm.qmpPath, name }).result;
        await new Promise((res) => setTimeout(res, 1500)); // the workload writes its disk ring meanwhile
      }
      let stops = 0;
      const off = guest.vm.qmp.on('STOP', () => stops++);
      const id = Object.values((await store.read()).snapshots).find((s) => s.name === 'b').id;
      const done = await collect(store, { deleting: [id] }).result;
      off();
      const m = done.merged[0];
      if (!m || m.error) throw new Error(`no merge: ${JSON.stringify(done.merged)}`);
      results.push({ ms: m.ms, bytes: m.bytes, pauses: m.pauses, stops });
      log(
        `merge run ${r + 1}: ${(m.bytes / 2 ** 20).toFixed(1)} MiB in ${m.ms.toFixed(0)} ms, ${stops} pauses`,
      );
    } finally {
      await guest.stop();
      await rm(dir, { recursive: true, force: true });
    }
  }
  return {
    runs: results.length,
    ms: median(results.map((x) => x.ms)),
    mib: median(results.map((x) => x.bytes / 2 ** 20)),
    maxPauses: Math.max(...results.map((x) => x.stops)),
    all: results,
  };
}

const work = await mkdtemp(join(tmpdir(), 'qsnap-bench-store-'));
try {
  log(`list: ${count} snapshots, ${runs} runs`);
  const list = await listBench(work);
  log(`merge: ${runs} runs on the busy test guest`);
  const merge = await mergeBench(work);
  if (values.json) console.log(JSON.stringify({ list, merge }, null, 2));
  else {
    console.log(`| figure | value |\n|---|---|`);
    console.log(
      `| listSnapshots(), ${list.snapshots} snapshots (median of ${runs}) | ${list.listMs.toFixed(1)} ms |`,
    );
    console.log(
      `| \`qsnap list --json\`, ${list.snapshots} snapshots, whole command | ${list.commandMs.toFixed(0)} ms (node start-up alone ${list.nodeStartupMs.toFixed(0)} ms) |`,
    );
    console.log(
      `| live merge on delete (median of ${merge.runs}) | ${merge.ms.toFixed(0)} ms, ${merge.mib.toFixed(1)} MiB copied |`,
    );
    console.log(`| guest pauses during the merges | ${merge.maxPauses} |`);
  }
} finally {
  await rm(work, { recursive: true, force: true });
}
