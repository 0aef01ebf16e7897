/**
 * Bundles: the codec on byte literals (every bound refused), then a real round trip — a
 * snapshot of a running guest exported, imported into another store, restored only once its
 * foreign command line is trusted, and passing the workload's check — and bundles that were
 * damaged or made to break qsnap: refused, and nothing lands in the store.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readdirSync, readFileSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { exportBundle, importBundle } from '../../src/store/bundle.js';
import {
  BundleFormatError,
  checkHeader,
  decodeIndex,
  decodeTrailer,
  encodeHeader,
  encodeTrailer,
  HEADER_BYTES,
} from '../../src/store/bundle-format.js';
import { storeRestore } from '../../src/store/restore.js';
import { storeSnapshot } from '../../src/store/snapshot.js';
import { Store } from '../../src/store/store.js';
import { flipByte } from '../format/helpers.js';
import { ensureBuilt } from '../support/build.js';
import { expectCliError, runCli, runCliOnTerminal } from '../support/cli.js';
import { canRun } from '../support/env.js';
import { failure } from '../support/errors.js';
import { bootGuest, connectConsole, expectCheckOk, type Guest, stopGuest } from '../support/guest.js';
import { openSandbox, type Sandbox } from '../support/sandbox.js';

const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');
const ID = '0b6f6f7e-1d3c-4c8e-9a57-3f1f7a7e9e01';

function index(overrides: Record<string, unknown> = {}) {
  return {
    format: 'qsnap-bundle',
    version: 1,
    name: 'n',
    snapshotId: ID,
    createdAt: '2026-12-01T00:00:00.000Z',
    snapshot: { offset: HEADER_BYTES, length: 10, sha256: sha(Buffer.alloc(10)) },
    disks: [],
    ...overrides,
  };
}

describe('bundle codec', () => {
  it('reads back what it writes', () => {
    expect(() => checkHeader(encodeHeader())).not.toThrow();
    expect(decodeTrailer(encodeTrailer(100, 50), 174)).toEqual({ offset: 100, length: 50 });
    expect(decodeIndex(Buffer.from(JSON.stringify(index())), 26).snapshotId).toBe(ID);
  });

  it('refuses a wrong magic or version, a cut trailer, an index outside the file', () => {
    expect(() => checkHeader(Buffer.from('QSNAPXXX00000000'))).toThrow(BundleFormatError);
    const v2 = encodeHeader();
    v2.writeUInt32BE(2, 8);
    expect(() => checkHeader(v2)).toThrow(/version 2/);
    expect(() => decodeTrailer(encodeTrailer(100, 50).subarray(0, 23), 174)).toThrow(/QSNAPEND/);
    expect(() => decodeTrailer(encodeTrailer(100, 50), 175)).toThrow(/does not end/);
    expect(() => decodeTrailer(encodeTrailer(8, 50), 82)).toThrow(/does not end/);
    expect(() => decodeTrailer(encodeTrailer(16, 2 ** 40), 2 ** 40 + 40)).toThrow(/index of/);
  });

  it('refuses entries that overlap, reach past the index or are too many', () => {
    const at = (offset: number, length: number) => ({ offset, length, sha256: sha(Buffer.alloc(0)) });
    const disk = (offset: number, length: number) => ({ device: 'd', virtualSize: 1, ...at(offset, length) });
    const decode = (i: object, end = 1000) => decodeIndex(Buffer.from(JSON.stringify(i)), end);
    expect(() => decode(index({ snapshot: at(16, 2000) }))).toThrow(/outside/);
    expect(() => decode(index({ snapshot: at(0, 10) }))).toThrow(/overlaps/);
    expect(() => decode(index({ snapshot: at(16, 100), disks: [disk(50, 10)] }))).toThrow(/overlaps/);
    expect(() => decode(index({ disks: Array.from({ length: 65 }, (_, i) => disk(100 + i, 1)) }))).toThrow(
      /not valid/,
    );
    expect(() => decode(index({ snapshot: at(-1, 10) }))).toThrow(/not valid/);
    expect(() => decodeIndex(Buffer.from('{"format": "qsnap-bundle", '), 100)).toThrow(/not JSON/);
    expect(() => decodeIndex(Buffer.from([0xff, 0xfe]), 100)).toThrow(/not JSON/);
  });
});

describe.skipIf(!canRun)('bundles between stores', () => {
  let sandbox: Sandbox;
  let guest: Guest;
  let source: Store;
  let target: Store;
  let bundle: string;

  beforeAll(async () => {
    await ensureBuilt();
    sandbox = await openSandbox('bundle');
    guest = await bootGuest(sandbox);
    source = await Store.open({ dir: join(sandbox.root, 'here'), stateDir: sandbox.state });
    target = await Store.open({ dir: join(sandbox.root, 'there'), stateDir: sandbox.state });
    await storeSnapshot(source, { qmp: guest.vm.qmpPath, name: 'base' }).result;
    bundle = join(sandbox.root, 'base.qsnapb');
  });

  afterAll(async () => {
    await stopGuest(guest);
    await sandbox?.dispose();
  });

  const landed = () => [
    ...readdirSync(target.snapshotsDir),
    ...(existsSync(join(target.dir, 'disks'))
      ? readdirSync(join(target.dir, 'disks'), { recursive: true })
      : []),
  ];

  it('exports one file with the snapshot and its disk flattened; refuses to overwrite', async () => {
    const r = await exportBundle(source, { name: 'base', out: bundle }).result;
    expect(r.bytes).toBe(statSync(bundle).size);
    expect(r.disks).toHaveLength(1);
    expect(statSync(bundle).mode & 0o777).toBe(0o600);
    expect((await failure(exportBundle(source, { name: 'base', out: bundle }).result)).code).toBe(
      'QSNAP_STORE_EXISTS',
    );
  });

  it('imports into another store; its foreign command line runs only when trusted; the guest checks out', async () => {
    const imported = await importBundle(target, { file: bundle, name: 'from-here' }).result;
    expect(imported.cmdline?.[0]).toMatch(/qemu-system-x86_64$/);
    const entry = Object.values((await target.read()).snapshots)[0]!;
    expect(entry).toMatchObject({ name: 'from-here', cmdline: { source: 'imported' } });
    expect(entry.disks[0]!.top.startsWith(join(target.dir, 'disks'))).toBe(true);
    const refused = await failure(storeRestore(target, { name: 'from-here' }).result);
    expect(refused.code).toBe('QSNAP_STORE_UNTRUSTED');
    expect(refused.message).toContain(imported.cmdline!.join(' '));
    // The CLI: refused without a question in a script; on a terminal shown and asked, "n" refuses.
    const env = { QSNAP_STORE: target.dir, QSNAP_STATE_DIR: sandbox.state };
    const piped = await runCli(['restore', 'from-here'], env);
    expectCliError(piped, 'QSNAP_STORE_UNTRUSTED');
    const asked = await runCliOnTerminal(['restore', 'from-here'], env, 'n\n');
    expect(asked.code, asked.output).toBe(1);
    expect(asked.output).toContain('snapshot from-here came from another machine');
    expect(asked.output).toContain(`  ${imported.cmdline![0]}\r\n`);
    expect(asked.output).toContain('run it? [y/N]');
    expect(asked.output).toContain('[QSNAP_STORE_UNTRUSTED]');
    let shown: readonly string[] = [];
    const r = await storeRestore(target, {
      name: 'from-here',
      attached: true,
      confirmCmdline: async (argv) => {
        shown = argv;
        return true; // what answering "y" does
      },
    }).result;
    expect(shown).toEqual(imported.cmdline);
    try {
      expect(
        Object.keys(r.relocated).length,
        'a foreign command line gets sockets of its own',
      ).toBeGreaterThan(0);
      const serial = Object.entries(r.relocated).find(([from]) => from.endsWith('serial.sock'))![1];
      const console_ = await connectConsole(serial);
      await expectCheckOk(console_, 'restore of an imported bundle').finally(() => console_.close());
    } finally {
      await r.vm?.stop();
    }
    expect((await failure(importBundle(target, { file: bundle }).result)).code).toBe('QSNAP_STORE_EXISTS');
  });

  it('a damaged or hostile bundle is refused and nothing lands', async () => {
    const fresh = await Store.open({ dir: join(sandbox.root, 'fresh'), stateDir: sandbox.state });
    const copy = (name: string) => {
      const path = join(sandbox.root, name);
      writeFileSync(path, readFileSync(bundle));
      return path;
    };
    const flipped = copy('flipped.qsnapb');
    flipByte(flipped, Math.floor(statSync(flipped).size / 2));
    const cut = copy('cut.qsnapb');
    truncateSync(cut, statSync(cut).size - 100);
    const notBundle = join(sandbox.root, 'not.qsnapb');
    writeFileSync(notBundle, 'hello');
    for (const file of [flipped, cut, notBundle]) {
      const err = await failure(importBundle(fresh, { file }).result);
      expect(err.code, file).toBe('QSNAP_STORE_BUNDLE');
    }
    const withBacking = hostileBundle(sandbox.root);
    const err = await failure(importBundle(fresh, { file: withBacking }).result);
    expect(err.code).toBe('QSNAP_STORE_BUNDLE');
    expect(err.message).toMatch(/refers to another file/);
    expect(readdirSync(fresh.snapshotsDir)).toEqual([]);
    expect(Object.keys((await fresh.read()).snapshots)).toEqual([]);
    expect(landed().length, 'the earlier import only').toBeGreaterThan(0);
  });

  /** The real bundle with its disk swapped for a qcow2 whose backing file is /etc/passwd, checksums fixed up. */
  function hostileBundle(dir: string): string {
    const original = readFileSync(bundle);
    const where = decodeTrailer(original.subarray(original.length - 24), original.length);
    const idx = JSON.parse(original.subarray(where.offset, where.offset + where.length).toString('utf8'));
    const evil = join(dir, 'evil.qcow2');
    execFileSync('qemu-img', [
      'create',
      '-q',
      '-f',
      'qcow2',
      '-u',
      '-b',
      '/etc/passwd',
      '-F',
      'raw',
      evil,
      String(idx.disks[0].virtualSize),
    ]);
    const disk = readFileSync(evil);
    const snapshot = original.subarray(idx.snapshot.offset, idx.snapshot.offset + idx.snapshot.length);
    const diskOffset = HEADER_BYTES + snapshot.length;
    const newIndex = Buffer.from(
      JSON.stringify({
        ...idx,
        disks: [{ ...idx.disks[0], offset: diskOffset, length: disk.length, sha256: sha(disk) }],
      }),
    );
    const out = join(dir, 'hostile.qsnapb');
    const indexOffset = diskOffset + disk.length;
    writeFileSync(
      out,
      Buffer.concat([encodeHeader(), snapshot, disk, newIndex, encodeTrailer(indexOffset, newIndex.length)]),
    );
    return out;
  }
});
