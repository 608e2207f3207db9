// The page's state: the latest of each feed event, and who wants to hear when it changes.

export const store = {
  cluster: null,    // the trainer's /cluster (or the replicas asked directly), with .trainer.reachable
  runs: null,       // GET /runs
  publishes: null,  // GET /publishes
  history: null,    // GET /history
  versions: null,   // GET /versions
  receivedAt: 0,    // Date.now() of the last cluster event
};

const listeners = new Map();

export function on(name, fn) {
  if (!listeners.has(name)) listeners.set(name, []);
  listeners.get(name).push(fn);
}

export function set(name, value) {
  store[name] = value;
  for (const fn of listeners.get(name) || []) {
    try { fn(value); } catch (err) { console.error(`render of ${name} failed`, err); }
  }
}
