import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { type CommandName, commands, isCommandName } from '../../src/qmp/commands.js';
import { greetingSchema } from '../../src/qmp/message.js';

/** Replies recorded from qemu-system-x86_64 7.2.22 (-S, one virtio qcow2 drive with a backing file). */
const recorded = JSON.parse(
  readFileSync(new URL('./fixtures/qemu-7.2-replies.json', import.meta.url), 'utf8'),
) as Record<string, unknown>;

function check(name: CommandName, value: unknown) {
  return commands[name].returns.safeParse(value);
}

describe('command table', () => {
  it('lists every command qsnap uses', () => {
    const required = [
      'qmp_capabilities',
      'query-status',
      'query-version',
      'query-name',
      'query-kvm',
      'query-block',
      'query-named-block-nodes',
      'query-memory-size-summary',
      'query-memdev',
      'qom-get',
      'qom-list',
      'query-migrate',
      'query-migrate-capabilities',
      'migrate-set-capabilities',
      'query-migrate-parameters',
      'migrate-set-parameters',
      'migrate',
      'migrate-incoming',
      'migrate_cancel',
      'stop',
      'cont',
      'quit',
      'system_reset',
      'transaction',
      'blockdev-add',
      'blockdev-del',
      'blockdev-snapshot',
      'blockdev-snapshot-sync',
      'block-commit',
      'query-jobs',
      'job-complete',
      'job-dismiss',
      'job-cancel',
      'query-command-line-options',
      'query-cpus-fast',
      'human-monitor-command',
      'query-commands',
    ];
    expect(required.filter((n) => !isCommandName(n))).toEqual([]);
    expect(isCommandName('no-such-command')).toBe(false);
    expect(isCommandName('toString')).toBe(false);
  });

  it('accepts the greeting QEMU 7.2 sent', () => {
    expect(greetingSchema.safeParse(recorded['greeting']).success).toBe(true);
  });

  const recordedNames = Object.keys(recorded).filter((k) => k !== 'greeting');
  it.each(recordedNames)('accepts the reply QEMU 7.2 gave to %s', (name) => {
    expect(isCommandName(name)).toBe(true);
    const result = check(name as CommandName, recorded[name]);
    expect(result.error?.issues ?? []).toEqual([]);
  });

  it('types what it reads from real replies', () => {
    const status = commands['query-status'].returns.parse(recorded['query-status']);
    expect(status).toMatchObject({ status: 'prelaunch', running: false, singlestep: false });
    const [block] = commands['query-block'].returns.parse(recorded['query-block']);
    expect(block?.inserted?.image['backing-image']?.filename).toMatch(/base\.qcow2$/);
    expect(block?.inserted?.backing_file_depth).toBe(1);
  });

  it.each([
    ['query-status', { status: 'running' }],
    ['query-status', { status: 'running', running: 'yes' }],
    ['query-version', { qemu: { major: 7, minor: 2, micro: 0 } }],
    ['query-kvm', { enabled: true }],
    ['query-block', [{ device: 'virtio0', locked: false }]],
    ['query-named-block-nodes', [{ 'node-name': 'n0', drv: 'qcow2' }]],
    ['query-memory-size-summary', {}],
    ['qom-list', [{ type: 'string' }]],
    ['query-migrate', { status: 7 }],
    ['query-migrate-capabilities', [{ capability: 'events' }]],
    ['query-jobs', [{ id: 'j', type: 'commit', status: 'ready' }]],
    ['query-cpus-fast', [{ 'cpu-index': 0 }]],
    ['human-monitor-command', { text: 'x' }],
    ['query-commands', {}],
    ['stop', 'ok'],
  ] as [CommandName, unknown][])('rejects a malformed reply to %s (negative control)', (name, value) => {
    expect(check(name, value).success).toBe(false);
  });

  it('is lenient where newer QEMUs differ', () => {
    // QEMU >= 8.1 dropped singlestep; newer versions may add members and enum values.
    expect(check('query-status', { status: 'running', running: true }).success).toBe(true);
    const later = commands['query-status'].returns.parse({
      status: 'some-new-state',
      running: false,
      extra: 1,
    });
    expect(later).toMatchObject({ status: 'some-new-state', extra: 1 });
    expect(check('query-migrate', {}).success).toBe(true);
    expect(
      check('query-migrate', { status: 'active', ram: { ...ramStats(), 'new-counter': 5 } }).success,
    ).toBe(true);
    // Commands returning {} resolve to undefined, whatever a newer QEMU puts in the object.
    expect(commands.stop.returns.parse({})).toBeUndefined();
    expect(commands.stop.returns.parse({ 'something-new': true })).toBeUndefined();
  });
});

function ramStats() {
  return {
    transferred: 1,
    remaining: 0,
    total: 2,
    duplicate: 0,
    skipped: 0,
    normal: 1,
    'normal-bytes': 4096,
    'dirty-pages-rate': 0,
    mbps: 1.5,
    'dirty-sync-count': 1,
    'postcopy-requests': 0,
    'page-size': 4096,
    'multifd-bytes': 0,
    'pages-per-second': 0,
    'precopy-bytes': 0,
    'downtime-bytes': 0,
    'postcopy-bytes': 0,
    'dirty-sync-missed-zero-copy': 0,
  };
}
