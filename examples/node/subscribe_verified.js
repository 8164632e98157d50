// React to confirmed addresses: node subscribe_verified.js [--queue NAME] [--max N]
// Prints one line per verimail.email.verified event. Without --queue it listens on a
// temporary queue (exclusive, deleted when it stops): events published while it is not
// running are not kept. With --queue NAME it declares the durable quorum queue
// {ns}.sub.NAME, as a real service does, which keeps collecting events after it stops;
// delete it when done: rabbitmqctl delete_queue verimail.sub.NAME
const amqp = require('amqplib');

const url = process.env.AMQP_URL || 'amqp://guest:guest@127.0.0.1:5672/%2f';
const ns = process.env.VERIMAIL_NAMESPACE || 'verimail';
const queueIdx = process.argv.indexOf('--queue');
const name = queueIdx > 0 ? process.argv[queueIdx + 1] : null;
const maxIdx = process.argv.indexOf('--max');
const max = maxIdx > 0 ? Number(process.argv[maxIdx + 1]) : Infinity;

async function main() {
  const conn = await amqp.connect(url);
  const ch = await conn.createChannel();
  await ch.assertExchange(ns, 'topic', { durable: true });
  const queue = name
    ? (await ch.assertQueue(`${ns}.sub.${name}`, { durable: true, arguments: { 'x-queue-type': 'quorum' } })).queue // name it after your service
    : (await ch.assertQueue('', { exclusive: true })).queue;
  await ch.bindQueue(queue, ns, 'verimail.email.verified');
  await ch.prefetch(16);
  const seen = new Set(); // events arrive at least once: deduplicate on the id (persist it in real code)
  let handled = 0;
  console.error(`waiting for verimail.email.verified on ${queue}`);
  await ch.consume(queue, async (msg) => {
    const event = JSON.parse(msg.content.toString());
    if (!seen.has(event.id)) {
      seen.add(event.id);
      const d = event.data;
      console.log(`verified user_id=${d.user_id} email=${d.email} purpose=${d.purpose} request_id=${d.request_id} event=${event.id}`);
    }
    ch.ack(msg); // only once handled
    if (++handled >= max) { await conn.close(); }
  });
  const stop = async () => { await conn.close().catch(() => {}); process.exit(0); };
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);
}

main().catch((e) => { console.error(`error: ${e.message}`); process.exit(1); });
