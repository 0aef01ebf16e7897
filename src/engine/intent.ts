import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { mkdir, readFile, realpath, rename, rm, writeFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join, resolve } from 'node:path';
import { z } from 'zod';
import type { QmpClient } from '../qmp/index.js';
import { discardOverlays } from './disks/freeze.js';
import { SnapshotError } from './errors.js';
import { MIGRATION_UNSETTLED, pollMigration } from './migration.js';

/**
 * Intent records: before qsnap changes a VM (pauses it, adds block nodes, changes migration
 * settings) it writes down what it is about to do, keyed by the VM's QMP socket. The record
 * doubles as a per-VM lock. If qsnap dies (even by SIGKILL) between pause and resume, the
 * next qsnap command against that VM finds the record, sees its owner is gone, and puts the
 * VM back: resumes the guest if it was running, cancels the migration, removes temporary
 * files and unused nodes, restores migration settings.
 */

const OverlaySchema = z.object({
  device: z.string(),
  node: z.string(),
  overlayFile: z.string(),
  overlayNode: z.string(),
  /** The transaction ran: the guest writes to the overlay now and it must stay. */
  inUse: z.boolean(),
});

export const IntentSchema = z.object({
  version: z.literal(1),
  qmp: z.string(),
  owner: z.object({ pid: z.number().int(), startTime: z.string() }),
  operation: z.enum(['snapshot', 'restore']),
  vmWasRunning: z.boolean(),
  stage: z.enum(['prepared', 'paused', 'streaming', 'finishing']),
  tempFiles: z.array(z.string()),
  overlays: z.array(OverlaySchema),
  migration: z
    .object({
      capabilities: z.array(z.object({ capability: z.string(), state: z.boolean() })),
      maxBandwidth: z.number().optional(),
    })
    .optional(),
  createdAt: z.string(),
});
export type Intent = z.infer<typeof IntentSchema>;

export function stateDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env['QSNAP_STATE_DIR']) return resolve(env['QSNAP_STATE_DIR']);
  const base = env['XDG_STATE_HOME'] || join(homedir(), '.local', 'state');
  return join(base, 'qsnap');
}

async function intentPath(qmpPath: string): Promise<string> {
  let key = resolve(qmpPath);
  try {
    key = await realpath(qmpPath);
  } catch {
    // a socket that does not exist yet keys by its absolute path
  }
  const hash = createHash('sha256').update(key).digest('hex').slice(0, 24);
  return join(stateDir(), 'intents', `${hash}.json`);
}

/** Process start time (jiffies since boot), so a reused pid is not mistaken for the owner. */
export function processStartTime(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Field 22; the command name (field 2) may contain spaces and parentheses.
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
  } catch {
    return undefined;
  }
}

function ownerAlive(owner: Intent['owner']): boolean {
  return processStartTime(owner.pid) === owner.startTime;
}

/** The record at `path`: `absent` when there is none, `intent` undefined when it is unreadable. */
async function readIntentFile(path: string): Promise<{ absent: boolean; intent: Intent | undefined }> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { absent: true, intent: undefined };
    throw err;
  }
  const parsed = IntentSchema.safeParse(JSON.parse(text));
  // An unreadable record cannot be acted on; treat it as stale and let it be replaced.
  return { absent: false, intent: parsed.success ? parsed.data : undefined };
}

async function readIntent(path: string): Promise<Intent | undefined> {
  return (await readIntentFile(path)).intent;
}

export class IntentHandle {
  /** Updates are written one after another (tmp + rename), never interleaved. */
  private writes: Promise<void> = Promise.resolve();

  constructor(
    readonly path: string,
    private intent: Intent,
  ) {}

  get current(): Intent {
    return this.intent;
  }

  update(change: Partial<Omit<Intent, 'version' | 'owner' | 'qmp'>>): Promise<void> {
    this.intent = { ...this.intent, ...change };
    const snapshot = JSON.stringify(this.intent, null, 2);
    const write = async () => {
      const tmp = `${this.path}.${process.pid}.tmp`;
      await writeFile(tmp, snapshot);
      await rename(tmp, this.path);
    };
    this.writes = this.writes.then(write, write);
    return this.writes;
  }

  async release(): Promise<void> {
    await this.writes.catch(() => undefined);
    await rm(this.path, { force: true });
  }
}

function busy(held: Intent): SnapshotError {
  return new SnapshotError(
    'QSNAP_SNAPSHOT_BUSY',
    `another qsnap (pid ${held.owner.pid}) is already working on this VM (${held.operation})`,
    {
      hint: 'wait for it to finish, then run the command again',
      details: { pid: held.owner.pid, operation: held.operation, since: held.createdAt },
    },
  );
}

/**
 * Fails with QSNAP_SNAPSHOT_BUSY when a live qsnap holds this VM's lock. Checked before
 * connecting: QEMU serves one client per QMP socket, so a second connect would not fail but
 * wait, unanswered, until the first qsnap lets go.
 */
export async function assertNotBusy(qmpPath: string): Promise<void> {
  const held = await readIntent(await intentPath(qmpPath)).catch(() => undefined);
  if (held && ownerAlive(held.owner)) throw busy(held);
}

/**
 * Take the per-VM lock. Fails with QSNAP_SNAPSHOT_BUSY when a live qsnap holds it; a stale
 * record must have been recovered first (see recoverStaleIntent).
 */
export async function acquireIntent(
  qmpPath: string,
  init: Omit<Intent, 'version' | 'owner' | 'qmp' | 'createdAt'>,
): Promise<IntentHandle> {
  const path = await intentPath(qmpPath);
  await mkdir(join(stateDir(), 'intents'), { recursive: true });
  const intent: Intent = {
    version: 1,
    qmp: resolve(qmpPath),
    owner: { pid: process.pid, startTime: processStartTime(process.pid) ?? '' },
    createdAt: new Date().toISOString(),
    ...init,
  };
  try {
    await writeFile(path, JSON.stringify(intent, null, 2), { flag: 'wx' });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    const held = await readIntent(path);
    if (held && ownerAlive(held.owner)) throw busy(held);
    throw new SnapshotError(
      'QSNAP_SNAPSHOT_BUSY',
      'an interrupted qsnap operation on this VM has not been recovered',
      {
        hint: 'run `qsnap status --qmp <socket>` to recover it',
      },
    );
  }
  return new IntentHandle(path, intent);
}

/**
 * A background snapshot the dead qsnap began is being read to its end by its drain guard
 * (receiver.ts): cancelling it would hang the guest on QEMU 7.2, so wait for it. A plain
 * migration is cancelled.
 */
async function settleMigration(qmp: QmpClient, report: RecoveryReport): Promise<void> {
  const info = await qmp.execute('query-migrate');
  if (!MIGRATION_UNSETTLED.has(info.status ?? 'none')) return;
  const caps = await qmp.execute('query-migrate-capabilities');
  const background = caps.some((c) => c.capability === 'background-snapshot' && c.state);
  if (!background) {
    await qmp.execute('migrate_cancel');
    report.actions.push('cancelled the unfinished migration');
  }
  const settled = await pollMigration(qmp, {
    done: (status) => !MIGRATION_UNSETTLED.has(status),
    intervalMs: 50,
    timeoutMs: 10 * 60_000,
  });
  if (background)
    report.actions.push(`let the interrupted background snapshot run out (${settled.info.status})`);
}

export interface RecoveryReport {
  recovered: boolean;
  resumed: boolean;
  actions: string[];
  overlaysInUse: { device: string; overlayFile: string }[];
}

/**
 * Put a VM back in order after a qsnap that died mid-operation. Safe to call on every
 * connect: it does nothing unless a record exists whose owner is gone.
 */
export async function recoverStaleIntent(qmpPath: string, qmp: QmpClient): Promise<RecoveryReport> {
  const report: RecoveryReport = { recovered: false, resumed: false, actions: [], overlaysInUse: [] };
  const path = await intentPath(qmpPath);
  const { absent, intent } = await readIntentFile(path);
  if (absent) return report;
  if (intent && ownerAlive(intent.owner)) return report;
  report.recovered = true;
  if (intent) {
    await settleMigration(qmp, report);
    if (intent.vmWasRunning) {
      const status = await qmp.execute('query-status');
      if (
        !status.running &&
        (status.status === 'paused' || status.status === 'postmigrate' || status.status === 'finish-migrate')
      ) {
        await qmp.execute('cont');
        report.resumed = true;
        report.actions.push(`resumed the guest left ${status.status} by qsnap pid ${intent.owner.pid}`);
      }
    }
    // An overlay not marked in use may still be: qsnap can die between the transaction and
    // the record's update. Only a node QEMU lets go of (or never had) loses its file.
    const unused = intent.overlays.filter((o) => !o.inUse);
    const kept = new Set(await discardOverlays(qmp, unused));
    for (const overlay of intent.overlays) {
      if (overlay.inUse || kept.has(overlay)) {
        report.overlaysInUse.push({ device: overlay.device, overlayFile: overlay.overlayFile });
        report.actions.push(`disk ${overlay.device} now writes to ${overlay.overlayFile}`);
      } else {
        report.actions.push(`removed unused overlay ${overlay.overlayFile}`);
      }
    }
    if (intent.migration) {
      await qmp
        .execute('migrate-set-capabilities', { capabilities: intent.migration.capabilities })
        .catch(() => undefined);
      if (intent.migration.maxBandwidth !== undefined) {
        await qmp
          .execute('migrate-set-parameters', { 'max-bandwidth': intent.migration.maxBandwidth })
          .catch(() => undefined);
      }
      report.actions.push('restored migration settings');
    }
    for (const file of intent.tempFiles) {
      await rm(file, { force: true, recursive: true });
    }
    if (intent.tempFiles.length) report.actions.push(`removed ${intent.tempFiles.length} temporary file(s)`);
  }
  await rm(path, { force: true });
  return report;
}
