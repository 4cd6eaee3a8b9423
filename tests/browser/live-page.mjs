// The live page in a real browser: starts geostream-local with a simulated fleet, opens the
// page in Debian's headless Chromium (Playwright), waits for vehicles on the map and an alert
// in the feed, acknowledges the alert, opens a vehicle's details and track, checks the metric
// charts, saves a screenshot, and reports how long drawing the fleet takes.
//
//   node live-page.mjs --binary ../../target/debug/geostream-local --vehicles 500 \
//        --screenshot ../../target/live-page.png
//
// It stops the stack it started by its PID, whatever happens.

import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { parseArgs } from 'node:util';
import { chromium } from 'playwright-core';

const { values: options } = parseArgs({
  options: {
    binary: { type: 'string', default: '../../target/debug/geostream-local' },
    chromium: { type: 'string', default: '/usr/bin/chromium' },
    // 0: a free port, which geostream-local picks and reports.
    port: { type: 'string', default: '0' },
    vehicles: { type: 'string', default: '500' },
    'anomaly-rate': { type: 'string', default: '0.02' },
    screenshot: { type: 'string', default: '../../target/live-page.png' },
    'measure-s': { type: 'string', default: '5' },
  },
});

const stack = spawn(options.binary, [
  '--listen', `127.0.0.1:${options.port}`,
  '--simulate', '--vehicles', options.vehicles, '--interval-ms', '1000',
  '--anomaly-rate', options['anomaly-rate'], '--quiet',
], { stdio: ['ignore', 'pipe', 'inherit'] });
let stackExited = false;
stack.on('exit', () => { stackExited = true; });

function stopStack() {
  if (!stackExited && stack.pid) {
    try { process.kill(stack.pid, 'SIGTERM'); } catch { /* already gone */ }
  }
}
process.on('exit', stopStack);

// geostream-local's first line on stdout, once it serves, is `listening on http://ADDR`: the
// address it actually bound (with --port 0, a port it picked). The rest of its stdout is passed
// on.
function waitForStack(timeoutMs) {
  const lines = createInterface({ input: stack.stdout });
  return new Promise((resolve, reject) => {
    let first = true;
    const timer = setTimeout(
      () => reject(new Error(`geostream-local did not serve within ${timeoutMs} ms`)), timeoutMs);
    lines.on('line', line => {
      if (!first) { console.log(line); return; }
      first = false;
      clearTimeout(timer);
      const match = /^listening on (http:\/\/\S+)$/.exec(line);
      if (match) resolve(match[1]);
      else reject(new Error(`geostream-local's first line is not its address: ${line}`));
    });
    lines.on('close', () => {
      clearTimeout(timer);
      if (first) reject(new Error('geostream-local exited before serving (its log is above)'));
    });
  });
}

function check(condition, message) {
  if (!condition) throw new Error(message);
  console.log(`ok - ${message}`);
}

let browser;
let base;
try {
  base = await waitForStack(60_000);
  browser = await chromium.launch({
    executablePath: options.chromium,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
  });
  // A geofence where the simulated fleet drives (it starts around Berlin's centre): drawn on
  // the map, and its enters listed among the fleet events.
  const geofence = await fetch(`${base}/v1/geofences/mitte`, {
    method: 'PUT', headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ name: 'Mitte', geometry: { type: 'Point', coordinates: [13.405, 52.52], radius_m: 3000 },
      speed_limit_kmh: 50, dwell_s: 0 }),
  });
  check(geofence.ok, `a geofence is stored (${geofence.status})`);
  const page = await browser.newPage({ viewport: { width: 1440, height: 1000 } });
  const pageErrors = [];
  page.on('pageerror', error => pageErrors.push(String(error)));
  await page.goto(base + '/');

  await page.waitForFunction(() => window.geostreamLive.drawn > 0, null, { timeout: 30_000 });
  const drawn = await page.evaluate(() => window.geostreamLive.drawn);
  check(drawn > 0, `the map draws the fleet (${drawn} vehicles in view)`);

  await page.waitForSelector('#alerts li button.ack', { timeout: 60_000 });
  const alert = page.locator('#alerts li', { has: page.locator('button.ack') }).first();
  const alertText = (await alert.locator('.what').innerText()).trim();
  check(alertText.length > 0, `an alert appears in the live feed: ${alertText.replace(/\s+/g, ' ')}`);
  const alertId = await alert.locator('button.ack').getAttribute('data-alert');
  await alert.locator('button.ack').click();
  await page.waitForFunction(
    id => [...document.querySelectorAll('#alerts li')].some(li => li.innerHTML.includes('acked by operator')) ||
      !document.querySelector(`button.ack[data-alert="${CSS.escape(id)}"]`),
    alertId, { timeout: 10_000 });
  const stored = await (await fetch(`${base}/v1/alerts?state=active&limit=200`)).json();
  const acknowledged = stored.alerts.find(a => a.alert_id === alertId);
  check(!acknowledged || acknowledged.acknowledged_by === 'operator',
    'acknowledging in the page acknowledges the alert in the store (or it has cleared meanwhile)');

  await page.waitForFunction(() => window.geostreamLive.geofences !== undefined, null, { timeout: 15_000 });
  const shapes = await page.evaluate(() => window.geostreamLive.geofenceShapes);
  check(shapes === 1, `the map draws the geofence (${shapes} shape)`);
  await page.waitForSelector('#fleet-events li', { timeout: 30_000 });
  const firstEvent = (await page.locator('#fleet-events li').first().innerText()).replace(/\s+/g, ' ');
  check(/entered mitte|left mitte|speeding/.test(firstEvent), `fleet events are listed beside the alerts: ${firstEvent}`);

  // Charts: one per widget of the dashboard definition, with data.
  const definition = await (await fetch(`${base}/local/dashboard.json`)).json();
  await page.waitForFunction(() => document.querySelectorAll('#charts .chart canvas').length > 0);
  const charts = await page.locator('#charts .chart').count();
  check(charts === definition.widgets.length, `one chart per dashboard widget (${charts})`);

  // Let the fleet move, then measure: draw time per frame while panning and while updating.
  const measureMs = Number(options['measure-s']) * 1000;
  await page.evaluate(() => Object.assign(window.geostreamLive, { draws: 0, totalDrawMs: 0, maxDrawMs: 0 }));
  const frames = await page.evaluate(async ms => {
    const gaps = [];
    let last = performance.now();
    const end = last + ms;
    const map = window.geostreamLive.map;
    let step = 0;
    return await new Promise(resolve => {
      function frame(now) {
        gaps.push(now - last); last = now;
        // Pan every frame, back and forth, as a user dragging the map would: every frame
        // redraws the whole fleet.
        const direction = Math.floor(step++ / 60) % 2 ? -1 : 1;
        map.panBy([3 * direction, 2 * direction], { animate: false });
        if (now < end) requestAnimationFrame(frame); else resolve(gaps);
      }
      requestAnimationFrame(frame);
    });
  }, measureMs);
  const live = await page.evaluate(() => {
    const { map, ...figures } = window.geostreamLive;
    return figures;
  });
  frames.sort((a, b) => a - b);
  const p = q => frames[Math.min(frames.length - 1, Math.floor(q * frames.length))];
  console.log(JSON.stringify({
    vehicles: live.vehicles, drawn: live.drawn, draws: live.draws,
    mean_draw_ms: +(live.totalDrawMs / Math.max(1, live.draws)).toFixed(2), max_draw_ms: +live.maxDrawMs.toFixed(2),
    frames: frames.length, frame_gap_p50_ms: +p(0.5).toFixed(1), frame_gap_p99_ms: +p(0.99).toFixed(1),
  }));

  // Open the alerted vehicle: details and its recent track.
  await page.locator('#alerts li .what').first().click();
  await page.waitForSelector('#details dl', { timeout: 10_000 });
  const details = await page.locator('#details dl').innerText();
  check(/track \(1 h\)\s+\d+ readings/.test(details), 'vehicle details show its recent track');
  // Open a vehicle from the fleet events: its details list them.
  // Read and click the item in one step: the list is redrawn every 2 s.
  const eventDevice = await page.evaluate(() => {
    const item = document.querySelector('#fleet-events li');
    item.click();
    return item.dataset.device;
  });
  await page.waitForFunction(id => (document.querySelector('#details dl') || {}).innerText?.includes(id), eventDevice, { timeout: 10_000 });
  const eventDetails = await page.locator('#details dl').innerText();
  check(/events\s+[^\n]*mitte/.test(eventDetails), `vehicle details list its fleet events (${eventDevice})`);

  await page.screenshot({ path: options.screenshot, fullPage: true });
  check(pageErrors.length === 0, `no script errors in the page${pageErrors.length ? ': ' + pageErrors.join('; ') : ''}`);
  console.log(`screenshot: ${options.screenshot}`);
} catch (error) {
  console.error(`not ok - ${error.message}`);
  process.exitCode = 1;
} finally {
  if (browser) await browser.close();
  stopStack();
}
