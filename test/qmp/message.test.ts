import { describe, expect, it } from 'vitest';
import { parseMessage, timestampToUs } from '../../src/qmp/message.js';

describe('parseMessage', () => {
  it('classifies a greeting (as QEMU 7.2 sends it)', () => {
    const greeting = {
      QMP: {
        version: { qemu: { micro: 22, minor: 2, major: 7 }, package: 'Debian 1:7.2+dfsg-7+deb12u18+b3' },
        capabilities: ['oob'],
      },
    };
    const message = parseMessage(greeting);
    expect(message.kind).toBe('greeting');
    if (message.kind === 'greeting') expect(message.greeting.QMP.version.qemu.major).toBe(7);
  });

  it('classifies success and error replies and keeps their ids', () => {
    expect(parseMessage({ return: {}, id: 4 })).toEqual({ kind: 'return', id: 4, value: {} });
    expect(parseMessage({ return: 'text', id: 'x' })).toEqual({ kind: 'return', id: 'x', value: 'text' });
    expect(
      parseMessage({ error: { class: 'CommandNotFound', desc: 'The command nosuch has not been found' } }),
    ).toEqual({
      kind: 'error',
      id: undefined,
      errorClass: 'CommandNotFound',
      desc: 'The command nosuch has not been found',
    });
  });

  it('classifies events with and without data', () => {
    const stop = parseMessage({ timestamp: { seconds: 1795295163, microseconds: 140891 }, event: 'STOP' });
    expect(stop).toMatchObject({ kind: 'event', event: { event: 'STOP' } });
    const migration = parseMessage({
      timestamp: { seconds: 1, microseconds: 2 },
      event: 'MIGRATION',
      data: { status: 'setup' },
    });
    expect(migration).toMatchObject({ kind: 'event', event: { data: { status: 'setup' } } });
  });

  it('computes microseconds since the epoch from QEMU timestamps', () => {
    expect(timestampToUs({ seconds: 1795295163, microseconds: 140891 })).toBe(1795295163140891);
    expect(Number.isSafeInteger(timestampToUs({ seconds: 4102444800, microseconds: 999999 }))).toBe(true);
  });

  it.each([
    ['a non-object', [1, 2]],
    ['null', null],
    ['an object of no known kind', { hello: 'world' }],
    ['an event without timestamp', { event: 'STOP' }],
    ['an event with a bad timestamp', { event: 'STOP', timestamp: { seconds: '1', microseconds: 0 } }],
    ['an error reply without desc', { error: { class: 'GenericError' }, id: 1 }],
    [
      'a greeting without capabilities',
      { QMP: { version: { qemu: { major: 7, minor: 2, micro: 0 }, package: '' } } },
    ],
  ])('rejects %s with QSNAP_QMP_PROTOCOL', (_what, value) => {
    expect(() => parseMessage(value)).toThrow(
      expect.objectContaining({ code: 'QSNAP_QMP_PROTOCOL', reason: 'unexpected-message' }),
    );
  });
});
