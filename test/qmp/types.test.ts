/**
 * Compile-time checks of the typed command table: `npx tsc --noEmit` fails if a type regresses
 * (the @ts-expect-error lines fail when the error they expect disappears).
 */
import { describe, expectTypeOf, it } from 'vitest';
import type { CommandArgs, CommandReturn, QmpClient } from '../../src/qmp/index.js';

describe('command types', () => {
  it('types replies from the table', () => {
    expectTypeOf<CommandReturn<'query-status'>>().toHaveProperty('running').toBeBoolean();
    expectTypeOf<CommandReturn<'query-status'>['singlestep']>().toEqualTypeOf<boolean | undefined>();
    expectTypeOf<CommandReturn<'human-monitor-command'>>().toBeString();
    expectTypeOf<CommandReturn<'stop'>>().toBeUndefined();
    expectTypeOf<CommandReturn<'qom-get'>>().toBeUnknown();
    expectTypeOf<CommandReturn<'query-jobs'>[number]['current-progress']>().toBeNumber();
    expectTypeOf<CommandArgs<'blockdev-del'>>().toEqualTypeOf<{ 'node-name': string }>();
  });

  it('requires arguments only where the command has required ones', () => {
    // Never called: these lines only have to compile (or fail to, where marked).
    const calls = async (client: QmpClient) => {
      await client.execute('query-status');
      await client.execute('quit', undefined, { timeoutMs: 5 });
      await client.execute('query-named-block-nodes', { flat: true });
      await client.execute('query-named-block-nodes');
      // @ts-expect-error qom-get needs path and property
      await client.execute('qom-get');
      // @ts-expect-error property is required
      await client.execute('qom-get', { path: '/machine' });
      // @ts-expect-error capability names are open strings, but not numbers
      await client.execute('migrate-set-capabilities', { capabilities: [{ capability: 1, state: true }] });
      // @ts-expect-error not in the table: use executeRaw
      await client.execute('x-no-such-command');
      await client.executeRaw('x-no-such-command', { any: 1 });
      await client.execute('transaction', {
        actions: [{ type: 'blockdev-snapshot-sync', data: { 'node-name': 'n', 'snapshot-file': '/f' } }],
      });
    };
    expectTypeOf(calls).toBeFunction();
  });
});
