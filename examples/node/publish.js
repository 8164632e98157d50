// Publish one verimail request: node publish.js USER_ID EMAIL [LOCALE]
// Prints the event id (the request_id of every follow-up event) once RabbitMQ confirmed it.
const amqp = require('amqplib');
const { randomUUID } = require('node:crypto');

const url = process.env.AMQP_URL || 'amqp://guest:guest@127.0.0.1:5672/%2f';
const ns = process.env.VERIMAIL_NAMESPACE || 'verimail';

async function main([userId, email, locale]) {
  if (!userId || !email) throw new Error('usage: node publish.js USER_ID EMAIL [LOCALE]');
  const event = {
    specversion: '1.0',
    id: randomUUID(), // the idempotency key: reuse it when retrying the same request
    source: '/examples/node',
    type: 'verimail.verification.requested',
    time: new Date().toISOString(),
    datacontenttype: 'application/json',
    data: { user_id: userId, email, ...(locale && { locale }) },
  };
  const conn = await amqp.connect(url);
  try {
    const ch = await conn.createConfirmChannel();
    await ch.assertExchange(ns, 'topic', { durable: true });
    let returned = false; // mandatory: a message no queue takes comes back
    ch.on('return', () => { returned = true; });
    ch.publish(ns, event.type, Buffer.from(JSON.stringify(event)), {
      contentType: 'application/cloudevents+json',
      messageId: event.id,
      type: event.type,
      persistent: true,
      mandatory: true,
    });
    await ch.waitForConfirms(); // rejects if the broker nacked it
    if (returned) throw new Error(`no queue is bound to ${event.type} on exchange ${ns}: is the worker running?`);
    console.log(event.id);
  } finally {
    await conn.close();
  }
}

main(process.argv.slice(2)).catch((e) => { console.error(`error: ${e.message}`); process.exit(1); });
