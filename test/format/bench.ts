/**
 * Throughput of the snapshot writer and of verify. Not a test: run by hand,
 *   npx vite-node test/format/bench.ts [dir] [--gib=1] [--cold]
 * (--cold drops the page cache before verifying; needs root.)
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { openSnapshot } from '../../src/format/reader.js';
import { SnapshotWriter } from '../../src/format/writer.js';
import { DEVICE_TAIL, PAGE, PROLOGUE, rng, sampleInfo } from './fixtures.js';

const args = process.argv.slice(2);
const dir = fs.mkdtempSync(path.join(args.find((a) => !a.startsWith('--')) ?? os.tmpdir(), 'qsnap-bench-'));
const gib = Number(args.find((a) => a.startsWith('--gib='))?.slice(6) ?? 1);
const cold = args.includes('--cold');
const pages = (gib * 1024 ** 3) / PAGE;
const pool = randomBytes(4096 * PAGE); // 16 MiB of page contents, reused
const gbps = (bytes: number, ms: number) => `${(bytes / 1e6 / ms).toFixed(2)} GB/s`;

type Order = 'background' | 'linear' | 'random';

/** Page order: 'background' = 10 % scattered first (pages the guest dirtied), then the linear scan. */
function order(kind: Order): Uint32Array {
  const out = new Uint32Array(pages);
  const random = rng(42);
  if (kind === 'linear') return out.map((_, i) => i);
  if (kind === 'random') {
    out.forEach((_, i) => {
      out[i] = i;
    });
    for (let i = pages - 1; i > 0; i--) {
      const j = Math.floor(random() * (i + 1));
      [out[i], out[j]] = [out[j]!, out[i]!];
    }
    return out;
  }
  const early = new Uint8Array(pages);
  let n = 0;
  for (let i = 0; i < pages; i++) {
    if (random() < 0.1) {
      early[i] = 1;
      out[n++] = i;
    }
  }
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    [out[i], out[j]] = [out[j]!, out[i]!];
  }
  for (let i = 0; i < pages; i++) if (!early[i]) out[n++] = i;
  return out;
}

async function write(kind: Order, zeroShare: number): Promise<string> {
  const file = path.join(dir, `${kind}-${zeroShare}.qsnap`);
  const ord = order(kind);
  const random = rng(7);
  const t0 = performance.now();
  const w = await SnapshotWriter.create(file, { blocks: [{ name: 'pc.ram', usedLength: pages * PAGE }] });
  let dataBytes = 0;
  for (let i = 0; i < pages; i++) {
    const p = ord[i]!;
    if (random() < zeroShare) w.writeZeroPage(0, p * PAGE);
    else {
      const k = (p * 2654435761) % 4096;
      w.writePage(0, p * PAGE, pool.subarray(k * PAGE, (k + 1) * PAGE));
      dataBytes += PAGE;
    }
    if (w.needsDrain) await w.onceDrained();
  }
  const t1 = performance.now();
  await w.finish({ prologue: PROLOGUE, deviceTail: DEVICE_TAIL, info: sampleInfo() });
  const t2 = performance.now();
  const st = fs.statSync(file);
  console.log(
    `write ${kind.padEnd(10)} zero=${String(zeroShare * 100).padStart(2)}%: ${gib} GiB in ${(t2 - t0).toFixed(0)} ms ` +
      `(pages ${(t1 - t0).toFixed(0)} ms, finish+fsync ${(t2 - t1).toFixed(0)} ms) = ${gbps(pages * PAGE, t2 - t0)} of RAM, ` +
      `${gbps(dataBytes, t2 - t0)} of data; file ${st.size} B, allocated ${st.blocks * 512} B (data ${dataBytes} B)`,
  );
  return file;
}

async function verify(file: string): Promise<void> {
  if (cold) fs.writeFileSync('/proc/sys/vm/drop_caches', '3');
  const t0 = performance.now();
  const r = await openSnapshot(file);
  const t1 = performance.now();
  const res = await r.verify();
  const t2 = performance.now();
  await r.close();
  console.log(
    `verify ${path.basename(file)}${cold ? ' (cold cache)' : ''}: open ${(t1 - t0).toFixed(1)} ms, ` +
      `verify ${(t2 - t1).toFixed(0)} ms = ${gbps(res.bytesVerified, t2 - t1)}`,
  );
}

try {
  const a = await write('background', 0);
  await verify(a);
  const b = await write('background', 0.3);
  await verify(b);
  fs.rmSync(b);
  await write('linear', 0);
  const c = await write('random', 0);
  await verify(c);
  // readPages of a file without verification (restore's path), data only.
  const r = await openSnapshot(a);
  const t0 = performance.now();
  let bytes = 0;
  for await (const run of r.readPages(0)) if (run.kind === 'data') bytes += run.data.length;
  console.log(`readPages (no verify): ${gbps(bytes, performance.now() - t0)}`);
  await r.close();
} finally {
  fs.rmSync(dir, { recursive: true, force: true });
}
