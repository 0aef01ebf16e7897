import { describe, expect, expectTypeOf, it } from 'vitest';
import { QmpDisconnectedError } from '../../src/qmp/errors.js';
import { EventHub, type QmpEvent } from '../../src/qmp/events.js';

function message(event: string, data?: Record<string, unknown>, microseconds = 0) {
  return { event, ...(data ? { data } : {}), timestamp: { seconds: 10, microseconds } };
}

describe('EventHub', () => {
  it('keeps delivering when a listener throws, and logs it', () => {
    const logged: string[] = [];
    const hub = new EventHub((level, msg) => logged.push(`${level}: ${msg}`));
    const seen: string[] = [];
    hub.on('STOP', () => {
      throw new Error('listener bug');
    });
    hub.on('STOP', (e) => seen.push(e.event));
    hub.emit(message('STOP'));
    expect(seen).toEqual(['STOP']);
    expect(logged).toEqual(['error: QMP event listener for STOP threw']);
  });

  it('passes unknown events through with their raw data', () => {
    const hub = new EventHub();
    const seen: QmpEvent[] = [];
    hub.on('*', (e) => seen.push(e));
    hub.emit(message('VSERPORT_CHANGE', { id: 'c0', open: true }, 5));
    expect(seen).toEqual([
      {
        event: 'VSERPORT_CHANGE',
        data: { id: 'c0', open: true },
        timestamp: { seconds: 10, microseconds: 5 },
        timestampUs: 10_000_005,
      },
    ]);
  });

  it('waitFor rejects on abort and when its predicate throws', async () => {
    const hub = new EventHub();
    const controller = new AbortController();
    const aborted = hub.waitFor('STOP', undefined, { signal: controller.signal });
    controller.abort(new Error('cancelled'));
    await expect(aborted).rejects.toThrow('cancelled');
    const bad = hub.waitFor('STOP', () => {
      throw new Error('predicate bug');
    });
    hub.emit(message('STOP'));
    await expect(bad).rejects.toThrow('predicate bug');
  });

  it('end() finishes iterators and rejects waiters with the given error, once', async () => {
    const hub = new EventHub();
    const iterator = hub.events();
    const waiting = hub.waitFor('RESUME');
    const pendingNext = iterator.next();
    const error = new QmpDisconnectedError('/x', 'peer-closed');
    hub.end(error);
    hub.end(new QmpDisconnectedError('/x', 'closed-by-client'));
    await expect(waiting).rejects.toBe(error);
    expect(await pendingNext).toEqual({ done: true, value: undefined });
    hub.emit(message('RESUME'));
    expect(hub.ended).toBe(true);
  });

  it('types the data of known events', () => {
    expectTypeOf<QmpEvent<'MIGRATION'>['data']['status']>().toBeString();
    expectTypeOf<QmpEvent<'SHUTDOWN'>['data']['guest']>().toBeBoolean();
    expectTypeOf<QmpEvent<'JOB_STATUS_CHANGE'>['data']>().toHaveProperty('id').toBeString();
    expectTypeOf<QmpEvent<'SOMETHING_ELSE'>['data']>().toEqualTypeOf<Record<string, unknown>>();
    expectTypeOf<QmpEvent['data']>().toEqualTypeOf<Record<string, unknown>>();
  });
});
