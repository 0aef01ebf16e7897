/**
 * The pipe borrowed from `migrate exec:` (pipe-source.ts), with a shell standing in for QEMU:
 * `head` writes into a real pipe whose read end is the placeholder's stdin, as QEMU's
 * qio_channel_command_new_spawn sets it up.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { closeSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import {
  killLeftPlaceholder,
  killPlaceholder,
  openPlaceholderPipe,
  placeholderCommand,
} from '../../src/engine/snapshot/pipe-source.js';
import { readFdIntoReusedBuffer } from '../../src/engine/snapshot/socket-reader.js';
import { isAlive, waitUntil } from '../support/process.js';

describe('the placeholder of migrate exec: and its pipe', () => {
  const started: ChildProcess[] = [];
  const dirs: string[] = [];

  afterEach(() => {
    for (const c of started.splice(0)) c.kill('SIGKILL');
    for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
  });

  /** A directory whose name needs quoting in a shell command (a space and a quote). */
  function streamDir(): string {
    const dir = mkdtempSync(join(tmpdir(), "qsnap pipe 'test' "));
    dirs.push(dir);
    return dir;
  }

  /** `script` run by sh, where "$PLACEHOLDER" runs placeholderCommand(pidFile) as QEMU does (sh -c). */
  function shell(script: string, pidFile: string): ChildProcess {
    const child = spawn('/bin/sh', ['-c', script], {
      stdio: 'ignore',
      env: { ...process.env, PLACEHOLDER: placeholderCommand(pidFile) },
    });
    started.push(child);
    return child;
  }

  it('qsnap reads all of the stream through the placeholder, which is killed once held', async () => {
    const pidFile = join(streamDir(), 'placeholder.pid');
    const bytes = 3 * 1024 * 1024 + 17;
    shell(`head -c ${bytes} /dev/urandom | /bin/sh -c "$PLACEHOLDER"`, pidFile);
    const pipe = await openPlaceholderPipe(pidFile);
    expect(pipe).toBeDefined();
    expect(isAlive(pipe.placeholderPid)).toBe(true);
    killPlaceholder(pipe);
    let read = 0;
    const reader = readFdIntoReusedBuffer(pipe.fd, (chunk) => {
      read += chunk.length;
    });
    await new Promise<void>((resolve, reject) => {
      reader.on('end', resolve);
      reader.on('error', reject);
    });
    reader.destroy();
    // Every byte arrived although the placeholder, the pipe's only other reader, is gone.
    expect(read).toBe(bytes);
    await waitUntil(() => !isAlive(pipe.placeholderPid), 5000, 'the placeholder to be gone');
  });

  it('gives up with an error when no placeholder writes its pid in time', async () => {
    const pidFile = join(streamDir(), 'placeholder.pid');
    await expect(openPlaceholderPipe(pidFile, 50)).rejects.toThrow(/wrote no pid within 50 ms/);
  });

  it('kills the placeholder a dead qsnap left, and nothing that is not one', async () => {
    const pidFile = join(streamDir(), 'placeholder.pid');
    shell('head -c 10 /dev/zero | /bin/sh -c "$PLACEHOLDER"', pidFile);
    const pipe = await openPlaceholderPipe(pidFile);
    closeSync(pipe.fd);
    // Negative control: a pid file naming a process that is no placeholder (this one).
    const other = join(streamDir(), 'other.pid');
    writeFileSync(other, `${process.pid}\n`);
    expect(killLeftPlaceholder(other)).toBe(false);
    expect(killLeftPlaceholder(join(streamDir(), 'absent.pid'))).toBe(false);
    expect(killLeftPlaceholder(pidFile)).toBe(true);
    await waitUntil(() => !isAlive(pipe.placeholderPid), 5000, 'the placeholder to be killed');
  });

  it('refuses a pid whose stdin is not a pipe', async () => {
    const pidFile = join(streamDir(), 'placeholder.pid');
    shell(`/bin/sh -c "$PLACEHOLDER" < /dev/null`, pidFile);
    await expect(openPlaceholderPipe(pidFile)).rejects.toThrow(/does not hold a pipe/);
  });

  it('never kills a process whose stdin is not the pipe it held (a reused pid)', async () => {
    const dir = streamDir();
    const first = join(dir, 'a.pid');
    const second = join(dir, 'b.pid');
    shell('head -c 10 /dev/zero | /bin/sh -c "$PLACEHOLDER"', first);
    shell('head -c 10 /dev/zero | /bin/sh -c "$PLACEHOLDER"', second);
    const a = await openPlaceholderPipe(first);
    const b = await openPlaceholderPipe(second);
    // b's pid with a's pipe: the process there now holds another pipe.
    killPlaceholder({ ...a, placeholderPid: b.placeholderPid });
    await new Promise((r) => setTimeout(r, 100));
    expect(isAlive(b.placeholderPid), 'the other process lives').toBe(true);
    // Negative control: with its own pipe it is killed.
    killPlaceholder(b);
    await waitUntil(() => !isAlive(b.placeholderPid), 5000, 'the placeholder to be killed');
    killPlaceholder(a);
    closeSync(a.fd);
    closeSync(b.fd);
  });
});
