// Tool calling through the official SDK, online (plain and streaming) and in
// a batch, on a generated model carrying llama.cpp's real Llama 3.1 chat
// template (its calls are JSON objects). A random-weight model never starts
// a call by itself, so the requests push it with logit_bias on the "{"
// token; from there the template's grammar decides every token, and the
// answer must come back as message.tool_calls with valid arguments.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import {
  KVBATCH_BIN, VOCAB_DIR, childEnv, makeWorkDir, removeDir, startServer, stopServer, makeInputFile, uploadFile,
  waitForBatch, batchResults, assertCoverage,
} from './helpers.mjs';

const execFileP = promisify(execFile);
const TEMPLATES = path.join(VOCAB_DIR, '..', 'templates');
const BRACE = 90;  // "{" in llama.cpp's llama-bpe vocabulary (Llama 3's tokenizer)

const tools = [
  {
    type: 'function',
    function: {
      name: 'route',
      description: 'Route a support ticket to a team',
      parameters: {
        type: 'object',
        properties: { team: { type: 'string', enum: ['billing', 'tech', 'sales'] }, urgent: { type: 'boolean' } },
        required: ['team', 'urgent'],
        additionalProperties: false,
      },
    },
  },
  {
    type: 'function',
    function: {
      name: 'lookup_order',
      description: 'Look an order up by number',
      parameters: {
        type: 'object',
        properties: { order: { type: 'integer', minimum: 1, maximum: 999 } },
        required: ['order'],
        additionalProperties: false,
      },
    },
  },
];
const system = 'You are the support desk. Route every ticket with the tools.';
const messages = (user) => [{ role: 'system', content: system }, { role: 'user', content: user }];
const forced = { tools, parallel_tool_calls: false, logit_bias: { [BRACE]: 100 }, max_tokens: 120, temperature: 0 };

function checkArgs(name, args) {
  const v = JSON.parse(args);
  if (name === 'route') {
    assert.deepEqual(Object.keys(v).sort(), ['team', 'urgent']);
    assert.ok(['billing', 'tech', 'sales'].includes(v.team), args);
    assert.equal(typeof v.urgent, 'boolean');
  } else {
    assert.equal(name, 'lookup_order');
    assert.ok(Number.isInteger(v.order) && v.order >= 1 && v.order <= 999, args);
  }
}

let work;
let model;
let server;
let client;

before(async () => {
  work = await makeWorkDir('kvbatch-tools-');
  model = path.join(work.dir, 'llama31.gguf');
  await execFileP(KVBATCH_BIN, ['gen-model', '--preset', 'tiny', '-o', model, '--vocab',
    path.join(VOCAB_DIR, 'ggml-vocab-llama-bpe.gguf'), '--chat-template',
    path.join(TEMPLATES, 'meta-llama-Llama-3.1-8B-Instruct.jinja')], { env: childEnv() });
  server = await startServer({ model, dataDir: path.join(work.dir, 'data') });
  client = server.client();
});

after(async () => {
  await stopServer(server);
  removeDir(work && work.dir);
});

test('tool_choice required and a named function answer with tool_calls', async () => {
  const r = await client.chat.completions.create({ model: 'llama31', messages: messages('My invoice is wrong.'), tool_choice: 'required', ...forced });
  const c = r.choices[0];
  assert.equal(c.finish_reason, 'tool_calls', JSON.stringify(r));
  assert.equal(c.message.content, null);
  assert.equal(c.message.tool_calls.length, 1);
  const call = c.message.tool_calls[0];
  assert.equal(call.type, 'function');
  assert.match(call.id, /^call_[0-9a-f]{24}$/);
  checkArgs(call.function.name, call.function.arguments);
  assert.equal(call.function.arguments, JSON.stringify(JSON.parse(call.function.arguments)), 'compact JSON');

  for (const name of ['route', 'lookup_order']) {
    const n = await client.chat.completions.create({
      model: 'llama31', messages: messages('Where is order 12?'), ...forced, temperature: 0.9, seed: 7,
      tool_choice: { type: 'function', function: { name } },
    });
    assert.equal(n.choices[0].finish_reason, 'tool_calls');
    assert.equal(n.choices[0].message.tool_calls[0].function.name, name);
    checkArgs(name, n.choices[0].message.tool_calls[0].function.arguments);
  }
});

test('streaming: the deltas assemble into the same call as the plain answer', async () => {
  const body = { model: 'llama31', messages: messages('The site is down.'), tool_choice: 'required', ...forced };
  const plain = await client.chat.completions.create(body);
  const stream = await client.chat.completions.create({ ...body, stream: true });
  const calls = [];
  let content = '';
  let finish = null;
  let chunks = 0;
  for await (const chunk of stream) {
    const ch = chunk.choices[0];
    if (!ch) continue;
    chunks++;
    if (ch.delta.content) content += ch.delta.content;
    for (const d of ch.delta.tool_calls || []) {
      if (!calls[d.index]) {
        assert.ok(d.id && d.function.name, 'a call starts with its id and name');
        calls[d.index] = { id: d.id, name: d.function.name, arguments: '' };
      }
      calls[d.index].arguments += d.function.arguments || '';
    }
    if (ch.finish_reason) finish = ch.finish_reason;
  }
  assert.equal(finish, 'tool_calls');
  assert.equal(content, '');
  assert.ok(chunks > 3, 'arguments arrive in pieces');
  assert.equal(calls.length, 1);
  const want = plain.choices[0].message.tool_calls[0];
  assert.equal(calls[0].name, want.function.name);
  assert.deepEqual(JSON.parse(calls[0].arguments), JSON.parse(want.function.arguments));
});

test('tool results in the history, tool_choice auto and none', async () => {
  const history = [
    ...messages('Where is order 12?'),
    { role: 'assistant', content: null, tool_calls: [{ id: 'call_1', type: 'function', function: { name: 'lookup_order', arguments: '{"order":12}' } }] },
    { role: 'tool', tool_call_id: 'call_1', content: 'order 12: shipped on Monday' },
  ];
  const r = await client.chat.completions.create({ model: 'llama31', messages: history, tools, max_tokens: 8 });
  assert.ok(['stop', 'length', 'tool_calls'].includes(r.choices[0].finish_reason));
  // A random model left alone writes text (auto), and with none it is never read as calls.
  const none = await client.chat.completions.create({ model: 'llama31', messages: messages('Hi'), ...forced, tool_choice: 'none' });
  assert.equal(none.choices[0].message.tool_calls, undefined);
  assert.notEqual(none.choices[0].finish_reason, 'tool_calls');
  assert.equal(typeof none.choices[0].message.content, 'string');
  // Bad tool requests are a 400 naming the field.
  await assert.rejects(
    client.chat.completions.create({ model: 'llama31', messages: messages('Hi'), tools, tool_choice: { type: 'function', function: { name: 'nope' } } }),
    (e) => e.status === 400 && e.param === 'tool_choice');
  const unresolved = [{ type: 'function', function: { name: 'f', parameters: { type: 'object', properties: { x: { $ref: '#/nowhere' } } } } }];
  await assert.rejects(
    client.chat.completions.create({ model: 'llama31', messages: messages('Hi'), tools: unresolved, tool_choice: 'required' }),
    (e) => e.status === 400 && e.param === 'tools' && /nowhere/.test(e.message));
});

test('a batch of tool requests answers every line with its calls', async () => {
  const rows = Array.from({ length: 8 }, (_, i) => ({
    custom_id: `t${i}`,
    method: 'POST',
    url: '/v1/chat/completions',
    body: { model: 'llama31', messages: messages(`Ticket ${i}: ${i % 2 ? 'refund please' : 'login fails'}`), tool_choice: 'required', ...forced, temperature: 0.7 },
  }));
  const file = await uploadFile(client, makeInputFile(work.dir, 'tools.jsonl', rows));
  const created = await client.batches.create({ input_file_id: file.id, endpoint: '/v1/chat/completions', completion_window: '24h' });
  const batch = await waitForBatch(client, created.id, ['completed', 'failed'], 90000);
  assert.equal(batch.status, 'completed');
  const { output, errors } = await batchResults(client, batch);
  assert.equal(errors.length, 0, JSON.stringify(errors));
  assertCoverage(assert, rows.map((r) => r.custom_id), output);
  for (const line of output) {
    const c = line.response.body.choices[0];
    assert.equal(c.finish_reason, 'tool_calls', JSON.stringify(line));
    checkArgs(c.message.tool_calls[0].function.name, c.message.tool_calls[0].function.arguments);
  }
  // The tools and the system message are one shared prefix, computed once.
  assert.ok(output.some((l) => l.response.body.usage.prompt_tokens_details.cached_tokens > 100), 'prefix shared');
});
