// The live page in a real browser: starts geostream-local with a simulated fleet, opens the
// page in Debian's headless Chromium (Playwright), waits for vehicles on the map and an alert
// in the feed, acknowledges the alert, opens a vehicle's details and track, checks the metric
// charts, saves a screenshot, and reports how long drawing the fleet takes; then posts a van's
// morning with past times and plays it back (trips, stops and alerts on the map, the time
// slider moving), and saves a screenshot of that.
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
    'playback-screenshot': { type: 'string', default: '../../target/playback.png' },
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

// A datetime-local input's value for epoch ms, in this machine's time zone (the browser's).
const localInput = ms => new Date(ms - new Date(ms).getTimezoneOffset() * 60000).toISOString().slice(0, 16);

// A van's morning three hours ago, a reading every 30 s: parked 8 min, a 20 min drive, a 10 min
// stop, a 15 min drive whose second half overheats the engine, parked 8 min. Posted, then
// waited for until its trips are made; returns the range and what the API answers for it.
async function postMorning(base, device) {
  const step = 30_000;
  const start = Math.floor((Date.now() - 3 * 3600_000) / 60_000) * 60_000;
  const readings = [];
  let t = start, lat = 52.49, lon = 13.33;
  const park = minutes => {
    for (let i = 0; i < minutes * 60_000 / step; i++, t += step) {
      readings.push({ device_id: device, ts: t, lat, lon, speed_kmh: 0, engine_temp_c: 70 });
    }
  };
  let secondTripMiddle = null;
  const drive = (minutes, dLat, dLon, overheat) => {
    const n = minutes * 60_000 / step;
    for (let i = 0; i < n; i++, t += step) {
      lat += dLat / n; lon += dLon / n + Math.sin(i / 3) * 0.0004;
      readings.push({ device_id: device, ts: t, lat, lon, speed_kmh: 30 + 10 * Math.sin(i / 4), engine_temp_c: overheat && i > n / 2 ? 112 : 88 });
      if (overheat && i === Math.floor(n / 2)) secondTripMiddle = t;
    }
  };
  park(8); drive(20, 0.04, 0.07, false); park(10); drive(15, -0.03, 0.05, true); park(8);
  for (let i = 0; i < readings.length; i += 500) {
    const response = await fetch(`${base}/v1/telemetry`, {
      method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(readings.slice(i, i + 500)),
    });
    if (response.status !== 202) throw new Error(`posting the van's morning: ${response.status} ${await response.text()}`);
  }
  const from = start - 60_000, to = t + 60_000;
  const range = `from=${from}&to=${to}`;
  const deadline = Date.now() + 30_000;
  for (;;) {
    const trips = (await (await fetch(`${base}/v1/vehicles/${device}/trips?${range}`)).json()).trips;
    const stops = (await (await fetch(`${base}/v1/vehicles/${device}/stops?${range}`)).json()).stops;
    if (trips.length >= 2 || Date.now() > deadline) {
      return { from, to, readings: readings.length, trips: trips.length, stops: stops.length, secondTripMiddle };
    }
    await new Promise(resolve => setTimeout(resolve, 250));
  }
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
  console.log(`screenshot: ${options.screenshot}`);

  // Playback: a van's morning posted afterwards, as a tracker that was offline sends it.
  const range = await postMorning(base, 'playback-van');
  check(range.trips >= 2, `the van's morning has its trips (${range.trips}) and stops (${range.stops}) through the API`);
  await page.fill('#pb-vehicle', 'playback-van');
  await page.fill('#pb-from', localInput(range.from));
  await page.fill('#pb-to', localInput(range.to));
  await page.click('#pb-load');
  await page.waitForFunction(() => window.geostreamLive.playback.readings.length > 0, null, { timeout: 10_000 });
  const loaded = await page.evaluate(() => {
    const p = window.geostreamLive.playback;
    return { readings: p.readings.length, trips: p.trips.length, stops: p.stops.length, alerts: p.alerts.length, t: p.t, playhead: p.playhead };
  });
  check(loaded.readings === range.readings && loaded.trips === range.trips && loaded.stops === range.stops,
    `playback loads the van's ${loaded.readings} positions, ${loaded.trips} trips and ${loaded.stops} stops`);
  check(loaded.alerts >= 1, `playback shows the alert of its overheating engine (${loaded.alerts})`);
  await page.selectOption('#pb-speed', '1200');
  await page.click('#pb-play');
  await page.waitForTimeout(1500);
  const played = await page.evaluate(() => {
    const p = window.geostreamLive.playback;
    return { t: p.t, playhead: p.playhead, playing: p.playing };
  });
  const playedMinutes = (played.t - loaded.t) / 60000;
  check(playedMinutes > 5 && played.playhead.join() !== loaded.playhead.join(),
    `playing at 1200x moves the van along its track (${playedMinutes.toFixed(0)} min of its morning in 1.5 s)`);
  // Half way through its second trip, for the picture.
  await page.evaluate(t => {
    const slider = document.getElementById('pb-slider');
    if (window.geostreamLive.playback.playing) document.getElementById('pb-play').click();
    slider.value = t; slider.dispatchEvent(new Event('input'));
  }, range.secondTripMiddle);
  const scrubbed = await page.evaluate(() => window.geostreamLive.playback.t);
  check(scrubbed === range.secondTripMiddle, 'the time slider moves the playback');
  await page.screenshot({ path: options['playback-screenshot'] });
  console.log(`screenshot: ${options['playback-screenshot']}`);
  check(pageErrors.length === 0, `no script errors in the page${pageErrors.length ? ': ' + pageErrors.join('; ') : ''}`);
} catch (error) {
  console.error(`not ok - ${error.message}`);
  process.exitCode = 1;
} finally {
  if (browser) await browser.close();
  stopStack();
}
