/**
 * The dashboard in a real headless Chromium (Debian's `chromium`, driven by playwright-core): it
 * loads from the daemon (its session cookie, no token in the URL), shows an attached test VM,
 * takes a snapshot by a click (with its confirmation), shows the progress and then the new
 * snapshot in the tree. A page of another origin in the same browser is refused.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { type Browser, chromium } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { connect, type DaemonClient } from '../../src/client/client.js';
import { ensureBuilt } from '../support/build.js';
import { canRun } from '../support/env.js';
import { bootGuest, expectGuestHealthy, type Guest, stopGuest } from '../support/guest.js';
import { openSandbox, type Sandbox } from '../support/sandbox.js';
import { type Serve, startServe } from './serve.js';

const CHROMIUM = '/usr/bin/chromium';

describe.skipIf(!canRun || !existsSync(CHROMIUM))('the dashboard in Chromium', () => {
  let sandbox: Sandbox;
  let guest: Guest;
  let serve: Serve;
  let client: DaemonClient;
  let browser: Browser;
  let vm: string;

  beforeAll(async () => {
    ensureBuilt();
    sandbox = await openSandbox('dash');
    guest = await bootGuest(sandbox);
    serve = await startServe([], { ...sandbox.env, QSNAP_STORE: join(sandbox.root, 'store') });
    client = await connect(serve.url, { stateDir: sandbox.state });
    vm = (await client.attach({ qmp: guest.vm.qmpPath, name: 'web' })).vm;
    browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
  }, 120_000);

  afterAll(async () => {
    await browser?.close();
    await client?.close().catch(() => undefined);
    await serve?.stop();
    await stopGuest(guest);
    await sandbox?.dispose();
  });

  it('shows the VM, snapshots it by a click, shows the progress and the new snapshot', async () => {
    const page = await browser.newPage({ viewport: { width: 1100, height: 800 } });
    const base = serve.url.replace(/^ws/, 'http').replace(/\/v1$/, '/');
    const response = await page.goto(base);
    expect(response?.status()).toBe(200);
    expect(page.url(), 'no token in the URL').toBe(base);
    const row = page.locator(`tr[data-vm="${vm}"]`);
    await row.waitFor({ timeout: 15_000 });
    await expect.poll(() => row.locator('td').nth(2).textContent(), { timeout: 10_000 }).toBe('running');
    await page.locator('#conn').filter({ hasText: 'connected' }).waitFor();

    await row.locator('button.snapshot').click();
    await page.locator('#confirm-yes').click();
    // The running operation with a progress bar that moves.
    await page.locator(`.op[data-op]`).first().waitFor({ timeout: 30_000 });
    let widest = 0;
    await expect
      .poll(
        async () => {
          for (const style of await page
            .locator('.op .bar > div')
            .evaluateAll((els) => els.map((e) => e.getAttribute('style') ?? '')))
            widest = Math.max(widest, Number(/width: ([\d.]+)%/.exec(style)?.[1] ?? 0));
          return widest;
        },
        { timeout: 60_000, interval: 50 },
      )
      .toBeGreaterThan(0);
    const shown = await page.locator('.op').first().textContent();
    expect(shown).toMatch(/snapshot/);
    // The new snapshot in the tree, the one the store has.
    const item = page.locator('#tree li[data-snapshot^="web-"]');
    await item.first().waitFor({ timeout: 120_000 });
    const names = (await client.list()).snapshots.map((s) => s.name);
    const inTree = await item.first().getAttribute('data-snapshot');
    expect(names).toContain(inTree);
    await expect.poll(() => page.locator('#chart circle').count()).toBeGreaterThan(0);
    if (process.env['QSNAP_SCREENSHOT']) await page.screenshot({ path: process.env['QSNAP_SCREENSHOT'] });
    await expectGuestHealthy(guest);
  }, 180_000);

  it('refuses the WebSocket of a page from another origin (negative control of the Origin check)', async () => {
    const page = await browser.newPage();
    await page.goto('about:blank');
    const outcome = await page.evaluate(
      (url) =>
        new Promise<string>((resolve) => {
          const ws = new WebSocket(url);
          ws.onopen = () => resolve('open');
          ws.onerror = () => resolve('refused');
        }),
      serve.url,
    );
    expect(outcome).toBe('refused');
  });
});
