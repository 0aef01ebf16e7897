// QEMU's side of a measurement, over QMP: its events, migration capabilities, a migration to
// its end, a disk layer frozen for a stock restore, and a stock `-incoming` restore.
import { execFile } from 'node:child_process';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';

const run = promisify(execFile);
const MIGRATION_TIMEOUT_MS = 10 * 60_000;
/** What qsnap sets by default (src/engine/migration.ts): unlimited. */
export const UNLIMITED_BANDWIDTH = 2 ** 40;

/** STOP, RESUME and MIGRATION events seen on `qmp` until stop(); timestamps are QEMU's own. */
export function recordEvents(qmp) {
  const events = [];
  const off = ['STOP', 'RESUME', 'MIGRATION'].map((name) => qmp.on(name, (e) => events.push(e)));
  return {
    /** First STOP to the first RESUME after it (ms), or undefined when either is missing. */
    pauseMs() {
      const stop = events.find((e) => e.event === 'STOP');
      const resume = stop && events.find((e) => e.event === 'RESUME' && e.timestampUs >= stop.timestampUs);
      return resume ? (resume.timestampUs - stop.timestampUs) / 1000 : undefined;
    },
    stop() {
      for (const f of off) f();
    },
  };
}

/**
 * Sets migration capabilities for one measurement; the returned function puts back what was
 * there (a capability QEMU does not know is an error, so ask only for what this QEMU has).
 */
export async function withCapabilities(qmp, wanted) {
  const caps = await qmp.execute('query-migrate-capabilities');
  const before = Object.fromEntries(caps.map((c) => [c.capability, c.state]));
  const set = (states) =>
    qmp.execute('migrate-set-capabilities', {
      capabilities: Object.entries(states).map(([capability, state]) => ({ capability, state })),
    });
  await set({ events: true, ...wanted });
  return () => set(Object.fromEntries(Object.keys(wanted).map((k) => [k, before[k] ?? false])));
}

/** Resolves with the migration's final status from its MIGRATION events. Call before `migrate`. */
export function migrationEnd(qmp) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`the migration did not finish within ${MIGRATION_TIMEOUT_MS} ms`));
    }, MIGRATION_TIMEOUT_MS);
    timer.unref();
    const off = qmp.on('MIGRATION', (e) => {
      if (['completed', 'failed', 'cancelled'].includes(e.data.status)) {
        clearTimeout(timer);
        off();
        resolve(e.data.status);
      }
    });
  });
}

/**
 * query-migrate once it is final: 7.2 sets status completed before it computes total-time
 * (migration.c: bg_migration_completion, then migration_iteration_finish).
 */
export async function finishedMigration(qmp) {
  const deadline = Date.now() + 5000;
  for (;;) {
    const info = await qmp.execute('query-migrate');
    if (info.status !== 'completed' || info['total-time'] > 0 || Date.now() > deadline) return info;
    await sleep(5);
  }
}

/** Runs `migrate uri` to its end; throws unless it completed. */
export async function migrateToEnd(qmp, uri) {
  // The end is seen by its MIGRATION event, which QEMU sends only with this capability.
  await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
  const done = migrationEnd(qmp);
  await qmp.execute('migrate', { uri });
  const status = await done;
  const info = await finishedMigration(qmp);
  if (status !== 'completed') throw new Error(`migrate ${uri} ended ${status}: ${info['error-desc'] ?? ''}`);
  return info;
}

/** The guest's first disk: its top node, that node's file and the virtual size. */
export async function topDisk(qmp) {
  const blocks = await qmp.execute('query-block');
  const disk = blocks.find((b) => b.qdev?.includes('disk0-dev') && b.inserted);
  if (!disk) throw new Error('the guest has no disk0-dev');
  const { inserted } = disk;
  return { node: inserted['node-name'], file: inserted.file, sizeBytes: inserted.image['virtual-size'] };
}

/**
 * Puts the guest's disk under a new overlay (blockdev-snapshot-sync) and returns the layer it
 * wrote until now, which nothing writes any more: a stock restore opens an overlay on it.
 * Called while the guest is stopped it is point-in-time with the RAM saved in the same pause.
 */
export async function freezeDisk(qmp, dir, tag) {
  const top = await topDisk(qmp);
  await qmp.execute('blockdev-snapshot-sync', {
    'node-name': top.node,
    'snapshot-file': join(dir, `live-${tag}.qcow2`),
    'snapshot-node-name': `bench-${tag}`,
    format: 'qcow2',
  });
  return top;
}

/** A fresh overlay on a frozen layer, for one restore. */
export async function overlayOn(frozen, file) {
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', frozen, '-F', 'qcow2', file]);
  return file;
}

/**
 * `cont`, retried while QEMU refuses it because the migration that just completed is not
 * cleaned up yet (QEMU 10 answers "Migration is not finalized yet" for a moment after the
 * completed event and query-migrate both said completed).
 */
export async function cont(qmp) {
  const deadline = Date.now() + 10_000;
  for (;;) {
    try {
      return await qmp.execute('cont');
    } catch (err) {
      if (!/not finalized/.test(err.message) || Date.now() > deadline) throw err;
      await sleep(2);
    }
  }
}

/** Polls the destination's query-migrate until the incoming migration completed. */
export async function incomingDone(qmp) {
  for (;;) {
    const info = await qmp.execute('query-migrate');
    if (info.status === 'completed') return info;
    if (info.status === 'failed') throw new Error(`incoming migration failed: ${info['error-desc']}`);
    await sleep(1);
  }
}

/** Removes files, ignoring the ones that are gone. */
export async function removeAll(...files) {
  await Promise.all(files.filter(Boolean).map((f) => rm(f, { recursive: true, force: true })));
}

/**
 * Streams every layer between the guest's first disk image and its live overlay into the
 * overlay (block-stream with the first image as base), so the chain stays two layers long
 * however many saves froze a layer: every path of every run sees the same disk. The layers
 * taken out stay on disk (the work directory goes at the end).
 */
export async function collapseChain(qmp, baseNode = 'disk0') {
  const top = await topDisk(qmp);
  const blocks = await qmp.execute('query-block');
  const image = blocks.find((b) => b.inserted?.['node-name'] === top.node).inserted.image;
  let depth = 0;
  for (let i = image; i; i = i['backing-image']) depth++;
  if (depth <= 2) return;
  const jobId = `bench-stream-${Date.now()}`;
  const done = new Promise((resolve, reject) => {
    const off = qmp.on('BLOCK_JOB_COMPLETED', (e) => {
      if (e.data.device !== jobId) return;
      off();
      if (e.data.error) reject(new Error(`block-stream: ${e.data.error}`));
      else resolve();
    });
  });
  await qmp.execute('block-stream', { 'job-id': jobId, device: top.node, 'base-node': baseNode });
  await done;
}
