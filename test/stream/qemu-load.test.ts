/**
 * Real QEMU: a stream re-synthesized by the writer from the 7.2 background-snapshot fixture is
 * loaded by a fresh `qemu-system-x86_64 -incoming defer`, and guest memory is read back with
 * pmemsave. QMP is spoken by a few lines here (src/qmp is written separately).
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import {
  type MigrationStreamInput,
  MigrationStreamParser,
  type RamSetup,
  writeMigrationStream,
} from '../../src/stream/index.js';
import { hasQemu, QEMU } from '../support/env.js';
import {
  BACKGROUND_FIXTURE,
  type Collected,
  collectingSink,
  loadFixture,
  parseInChunks,
  runsFromImage,
} from './helpers.js';

/** Minimal QMP over a unix socket: greeting, qmp_capabilities, then one command at a time. */
class MiniQmp {
  private buffered = '';
  private waiting: Array<(msg: Record<string, unknown>) => void> = [];
  closed = false;

  private constructor(private readonly socket: net.Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (data: string) => {
      this.buffered += data;
      for (let nl = this.buffered.indexOf('\n'); nl >= 0; nl = this.buffered.indexOf('\n')) {
        const msg = JSON.parse(this.buffered.slice(0, nl)) as Record<string, unknown>;
        this.buffered = this.buffered.slice(nl + 1);
        if (!('event' in msg)) this.waiting.shift()?.(msg);
      }
    });
    socket.on('error', () => {});
    socket.on('close', () => {
      this.closed = true;
      for (const w of this.waiting.splice(0))
        w({ error: { class: 'Disconnected', desc: 'QMP socket closed' } });
    });
  }

  static async connect(path: string, qemu: ChildProcess): Promise<MiniQmp> {
    for (let attempt = 0; ; attempt++) {
      if (qemu.exitCode !== null) throw new Error(`QEMU exited with ${qemu.exitCode} before QMP was up`);
      try {
        const socket = await new Promise<net.Socket>((resolve, reject) => {
          const s = net.createConnection(path, () => resolve(s));
          s.once('error', reject);
        });
        const qmp = new MiniQmp(socket);
        await qmp.next(); // greeting
        await qmp.execute('qmp_capabilities');
        return qmp;
      } catch (err) {
        if (attempt > 100) throw err;
        await new Promise((r) => setTimeout(r, 50));
      }
    }
  }

  private next(): Promise<Record<string, unknown>> {
    return new Promise((resolve) => this.waiting.push(resolve));
  }

  async execute(command: string, args?: Record<string, unknown>): Promise<Record<string, unknown>> {
    const reply = this.next();
    this.socket.write(
      `${JSON.stringify(args ? { execute: command, arguments: args } : { execute: command })}\n`,
    );
    const msg = await reply;
    if (msg['error']) throw new Error(`${command}: ${JSON.stringify(msg['error'])}`);
    return msg['return'] as Record<string, unknown>;
  }

  close(): void {
    this.socket.destroy();
  }
}

const started: ChildProcess[] = [];
const tempDirs: string[] = [];

afterEach(async () => {
  for (const qemu of started.splice(0)) {
    if (qemu.exitCode === null && qemu.signalCode === null && qemu.pid !== undefined) {
      const exited = new Promise((r) => qemu.once('exit', r));
      process.kill(qemu.pid, 'SIGKILL');
      await exited;
    }
  }
  for (const dir of tempDirs.splice(0)) await rm(dir, { recursive: true, force: true });
});

async function tempDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'qsnap-stream-'));
  tempDirs.push(dir);
  return dir;
}

async function startIncoming(dir: string, machine: string, extra: string[] = []) {
  const sock = join(dir, 'qmp.sock');
  const qemu = spawn(
    QEMU,
    ['-accel', 'tcg', '-m', '128', '-machine', machine, '-nodefaults', '-display', 'none', '-S']
      .concat(['-qmp', `unix:${sock},server=on,wait=off`, '-incoming', 'defer'])
      .concat(extra),
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  started.push(qemu);
  let stderr = '';
  qemu.stderr!.setEncoding('utf8').on('data', (d: string) => {
    stderr += d;
  });
  const qmp = await MiniQmp.connect(sock, qemu);
  return { qemu, qmp, stderr: () => stderr };
}

/** Load `file` and wait: 'completed', 'failed', or 'exited' (7.2 exits when an incoming load fails). */
async function loadStream(qemu: ChildProcess, qmp: MiniQmp, file: string): Promise<string> {
  await qmp.execute('migrate-incoming', { uri: `exec:cat ${file}` });
  for (;;) {
    if (qmp.closed || qemu.exitCode !== null) return 'exited';
    let status: unknown;
    try {
      status = (await qmp.execute('query-migrate'))['status'];
    } catch {
      return 'exited';
    }
    if (status === 'completed' || status === 'failed') return status;
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function writeStreamFile(file: string, input: MigrationStreamInput): Promise<void> {
  await pipeline(Readable.from(writeMigrationStream(input)), createWriteStream(file));
}

async function pmem(qmp: MiniQmp, dir: string, addr: number, size: number): Promise<Buffer> {
  const filename = join(dir, `pmem-${addr.toString(16)}.bin`);
  await qmp.execute('pmemsave', { val: addr, size, filename });
  return readFile(filename);
}

// Guest-physical RAM of a pc machine below 1 MiB (less the VGA/ROM hole) and above it maps
// one-to-one onto pc.ram offsets.
const LOW = { addr: 0, size: 0xa0000 };
const HIGH = { addr: 0x100000, size: 0x8000000 - 0x100000 };

describe.skipIf(!hasQemu)('QEMU loads re-synthesized streams', () => {
  let original: Collected;
  let pcRam: Buffer;

  beforeAll(() => {
    const { sink, result } = collectingSink({ images: true });
    const parser = new MigrationStreamParser(sink);
    parser.feed(loadFixture(BACKGROUND_FIXTURE));
    parser.end();
    original = result;
    expect(original.ramSetup!.blocks[0]!.idstr).toBe('pc.ram');
    pcRam = original.images![0]!.data;
  });

  const input = (overrides: Partial<MigrationStreamInput> = {}): MigrationStreamInput => ({
    prologue: original.prologue!.bytes,
    ramSetup: { bytes: original.ramSetup!.bytes },
    pages: (_block, index) => runsFromImage(original.images![index]!),
    deviceTail: original.tail,
    ...overrides,
  });

  it('loads every page and the device state; guest memory matches the snapshot', async () => {
    const dir = await tempDir();
    const file = join(dir, 'stream.bin');
    await writeStreamFile(file, input());
    const { qemu, qmp, stderr } = await startIncoming(dir, original.prologue!.machine!);

    // Negative control: before the load, guest memory is not the snapshot's.
    const before = await pmem(qmp, dir, LOW.addr, LOW.size);
    expect(before.equals(pcRam.subarray(LOW.addr, LOW.addr + LOW.size))).toBe(false);

    expect(await loadStream(qemu, qmp, file), stderr()).toBe('completed');
    expect(await qmp.execute('query-status')).toMatchObject({ status: 'paused', running: false });
    const low = await pmem(qmp, dir, LOW.addr, LOW.size);
    expect(low.equals(pcRam.subarray(LOW.addr, LOW.addr + LOW.size))).toBe(true);
    const high = await pmem(qmp, dir, HIGH.addr, HIGH.size);
    expect(high.equals(pcRam.subarray(HIGH.addr, HIGH.addr + HIGH.size))).toBe(true);
    qmp.close();
  });

  it('loads a stream without pc.ram pages over a file-backed pc.ram (lazy restore)', async () => {
    const dir = await tempDir();
    const file = join(dir, 'stream.bin');
    const ramFile = join(dir, 'pc.ram');
    await writeFile(ramFile, pcRam);
    const ramHash = createHash('sha256').update(pcRam).digest('hex');
    await writeStreamFile(
      file,
      input({
        pages: (block, index) =>
          block.idstr === 'pc.ram' ? 'skip' : runsFromImage(original.images![index]!),
      }),
    );
    // The stream really carries nothing for pc.ram: its content can only come from the file.
    const sent = parseInChunks(await readFile(file), 'whole');
    expect(sent.summary!.blocks[0]).toEqual({ idstr: 'pc.ram', pages: 0, zeroPages: 0 });

    const { qemu, qmp, stderr } = await startIncoming(
      dir,
      `${original.prologue!.machine!},memory-backend=pc.ram`,
      ['-object', `memory-backend-file,id=pc.ram,size=128M,mem-path=${ramFile},share=off`],
    );
    expect(await loadStream(qemu, qmp, file), stderr()).toBe('completed');
    const high = await pmem(qmp, dir, HIGH.addr, HIGH.size);
    expect(high.equals(pcRam.subarray(HIGH.addr, HIGH.addr + HIGH.size))).toBe(true);
    qmp.close();
    expect(
      createHash('sha256')
        .update(await readFile(ramFile))
        .digest('hex'),
    ).toBe(ramHash);
  });

  it('refuses a stream whose block list does not match the machine (negative control)', async () => {
    const dir = await tempDir();
    const file = join(dir, 'stream.bin');
    const { bytes: _bytes, ...setup } = original.ramSetup!;
    const lying: RamSetup = {
      ...setup,
      blocks: setup.blocks.map((b) => (b.idstr === 'pc.ram' ? { ...b, usedLength: 0x4000000 } : b)),
    };
    await writeStreamFile(file, input({ ramSetup: lying, pages: () => 'skip' }));
    const { qemu, qmp } = await startIncoming(dir, original.prologue!.machine!);
    expect(await loadStream(qemu, qmp, file)).not.toBe('completed');
  });
});
