/**
 * QEMU option strings and argv splitting. Units first; then the splitter is held against the
 * real qemu-system-x86_64: every option this QEMU lists must be a flag for us exactly when
 * QEMU takes no argument for it.
 */
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import {
  formatQemuOpts,
  getOpt,
  joinArgv,
  opts,
  parseQemuOpts,
  type QemuOpts,
  setOpt,
  splitArgv,
} from '../../src/vm/qemu-opts.js';
import { hasQemu, QEMU } from '../support/env.js';

const run = promisify(execFile);

describe('parseQemuOpts', () => {
  it('reads key=value pairs in order and unescapes a doubled comma', () => {
    expect(parseQemuOpts('file=a,,b.img,if=virtio')).toEqual({
      pairs: [
        ['file', 'a,b.img'],
        ['if', 'virtio'],
      ],
    });
  });

  it('maps a bare key to on', () => {
    expect(parseQemuOpts('socket,id=c0,server').pairs).toEqual([
      ['socket', 'on'],
      ['id', 'c0'],
      ['server', 'on'],
    ]);
  });

  it('takes the leading value without = as the implied key when the option has one', () => {
    const o = parseQemuOpts('unix:/tmp/q.sock,server=on,wait=off', 'path');
    expect(o.implied).toBe('unix:/tmp/q.sock');
    expect(o.pairs).toEqual([
      ['server', 'on'],
      ['wait', 'off'],
    ]);
  });

  it('has no implied value when the first part is key=value', () => {
    const o = parseQemuOpts('driver=virtio-blk-pci,drive=disk0', 'driver');
    expect(o.implied).toBeUndefined();
    expect(getOpt(o, 'driver')).toBe('virtio-blk-pci');
  });

  it('keeps an escaped comma before = inside the implied value, as QEMU does', () => {
    // util/qemu-option.c get_opt_name_value: strcspn(params, "=,") meets the ',' of ',,'
    // first, so the whole leading value is the implied one.
    const o = parseQemuOpts('unix:/tmp/a,,b=c.sock,server=on', 'path');
    expect(o.implied).toBe('unix:/tmp/a,b=c.sock');
    expect(o.pairs).toEqual([['server', 'on']]);
  });

  it('skips empty parts', () => {
    expect(parseQemuOpts('a=1,,,b=2,').pairs).toEqual([
      ['a', '1,'],
      ['b', '2'],
    ]);
    expect(parseQemuOpts('').pairs).toEqual([]);
  });

  it('getOpt returns the last value of a repeated key, setOpt replaces every earlier one', () => {
    const o = parseQemuOpts('file=a,if=ide,file=b');
    expect(getOpt(o, 'file')).toBe('b');
    expect(getOpt(o, 'missing')).toBeUndefined();
    const changed = setOpt(o, 'file', 'c,d');
    expect(changed.pairs).toEqual([
      ['if', 'ide'],
      ['file', 'c,d'],
    ]);
    expect(o.pairs).toHaveLength(3); // the input is not modified
  });
});

describe('formatQemuOpts and opts', () => {
  it('escapes commas in the implied value and in values', () => {
    expect(formatQemuOpts({ implied: 'unix:/a,b', pairs: [['logfile', '/x,y']] })).toBe(
      'unix:/a,,b,logfile=/x,,y',
    );
  });

  it('opts writes booleans as on/off and leaves out undefined values', () => {
    expect(opts({ server: true, wait: false, path: undefined, size: 64 }, 'socket')).toBe(
      'socket,server=on,wait=off,size=64',
    );
    expect(opts({ id: 'x' })).toBe('id=x');
  });

  const awkward = ['a,b', 'a,', ',a', ',,', 'a,,b', 'x=y', '', 'plain'];
  it.each(awkward)('round-trips the value %j through format and parse', (value) => {
    const o: QemuOpts = { pairs: [['k', value]] };
    expect(parseQemuOpts(formatQemuOpts(o))).toEqual(o);
  });

  it.each(['unix:/tmp/a,b', '/p,', 'unix:/t/a,b=c'])('round-trips the implied value %j', (implied) => {
    const o: QemuOpts = { implied, pairs: [['server', 'on']] };
    expect(parseQemuOpts(formatQemuOpts(o), 'path')).toEqual(o);
  });
});

describe('splitArgv and joinArgv', () => {
  it('pairs options with their values and leaves flags alone', () => {
    expect(splitArgv(['-m', '64', '-S', '-nodefaults', '-name', 'x', '-no-reboot'])).toEqual([
      { option: '-m', value: '64' },
      { option: '-S', value: undefined },
      { option: '-nodefaults', value: undefined },
      { option: '-name', value: 'x' },
      { option: '-no-reboot', value: undefined },
    ]);
  });

  it('accepts --option like QEMU and normalizes it to -option', () => {
    expect(splitArgv(['--m', '64', '--preconfig'])).toEqual([
      { option: '-m', value: '64' },
      { option: '-preconfig', value: undefined },
    ]);
  });

  it('takes the next word as the value even when it starts with a dash', () => {
    expect(splitArgv(['-append', '-v console=ttyS0'])).toEqual([
      { option: '-append', value: '-v console=ttyS0' },
    ]);
  });

  it('keeps a positional (a disk image) and an option missing its value at the end', () => {
    expect(splitArgv(['disk.img', '-m'])).toEqual([
      { option: 'disk.img', value: undefined },
      { option: '-m', value: undefined },
    ]);
  });

  it('flags that are easy to miss do not swallow the next option', () => {
    const entries = splitArgv(['-usb', '-m', '64', '-mem-prealloc', '-smp', '2', '-singlestep', '-S']);
    expect(entries.map((e) => e.option)).toEqual([
      '-usb',
      '-m',
      '-mem-prealloc',
      '-smp',
      '-singlestep',
      '-S',
    ]);
  });

  it('joinArgv inverts splitArgv', () => {
    const argv = ['-nodefaults', '-m', '256M', '-drive', 'file=a,,b,if=virtio', '-S', 'disk.img'];
    expect(joinArgv(splitArgv(argv))).toEqual(argv);
  });
});

/** Options listed by `qemu -help`, e.g. `-m`, `--preconfig`, `-fda` (of `-fda/-fdb`). */
async function qemuOptions(): Promise<string[]> {
  const { stdout } = await run(QEMU, ['-help']);
  const names = new Set<string>();
  for (const line of stdout.split('\n')) {
    const match = /^(--?[A-Za-z0-9_-]+)(?:\/(-[A-Za-z0-9_-]+))?/.exec(line);
    if (match?.[1]) names.add(match[1]);
    if (match?.[2]) names.add(match[2]);
  }
  return [...names];
}

/**
 * Whether QEMU wants an argument for `option`: QEMU's first option pass (lookup_opt in
 * softmmu/vl.c) exits with "requires an argument" when a HAS_ARG option is last; for a flag
 * the second pass reaches -version first and exits 0.
 */
async function qemuTakesArgument(option: string): Promise<boolean> {
  try {
    await run(QEMU, ['-version', option], { timeout: 10_000 });
    return false;
  } catch (err) {
    const stderr = String((err as { stderr?: string }).stderr ?? '');
    if (stderr.includes('requires an argument')) return true;
    throw new Error(`unexpected answer from ${QEMU} -version ${option}: ${stderr}`);
  }
}

describe.skipIf(!hasQemu)('splitArgv against the real QEMU', () => {
  it('treats an option as a flag exactly when this QEMU takes no argument for it', async () => {
    const options = await qemuOptions();
    expect(options.length).toBeGreaterThan(50);
    const mismatches: string[] = [];
    let flags = 0;
    const queue = [...options];
    const worker = async () => {
      for (let option = queue.shift(); option; option = queue.shift()) {
        const takesArgument = await qemuTakesArgument(option);
        if (!takesArgument) flags++;
        const [entry] = splitArgv([option, '-m', '64']);
        const splitTakesArgument = entry?.value !== undefined;
        if (splitTakesArgument !== takesArgument)
          mismatches.push(`${option}: QEMU ${takesArgument ? 'takes' : 'takes no'} argument`);
      }
    };
    await Promise.all([worker(), worker(), worker(), worker()]);
    // Both kinds were seen, so the probe itself tells them apart.
    expect(flags).toBeGreaterThan(10);
    expect(flags).toBeLessThan(options.length - 50);
    expect(mismatches).toEqual([]);
  });
});
