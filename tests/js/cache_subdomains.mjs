// Runs AMP's own @ampproject/toolbox-cache-url over host names, for tests/test_amp_caches.py.
//
// stdin:  {"hosts": ["www.example.com", ...], "caches": ["cdn.ampproject.org", ...]}
// stdout: {"version": "<toolbox version>", "results": [one per host, in order]}, each result
//         {"subdomain": createCurlsSubdomain("https://" + host),
//          "cacheUrls": {cache: createCacheUrl(cache, "https://" + host)}}
//         or {"error": "<what the toolbox threw>"} (it throws on some malformed punycode).
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const toolbox = require('@ampproject/toolbox-cache-url');
const { version } = require('@ampproject/toolbox-cache-url/package.json');

async function run(host, caches) {
  const url = `https://${host}`;
  try {
    const subdomain = await toolbox.createCurlsSubdomain(url);
    const cacheUrls = {};
    for (const cache of caches) {
      cacheUrls[cache] = await toolbox.createCacheUrl(cache, url);
    }
    return { subdomain, cacheUrls };
  } catch (error) {
    return { error: `${error.name}: ${error.message}` };
  }
}

const { hosts, caches } = JSON.parse(readFileSync(0, 'utf8'));
const results = [];
for (const host of hosts) {
  results.push(await run(host, caches));
}
process.stdout.write(JSON.stringify({ version, results }));
