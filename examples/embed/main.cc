// Embeds the ramkv client: creates a table, writes a key, reads it back.
// Usage: embed [COORDINATOR_HOST:PORT]
#include <ramkv/client.h>

#include <cstdio>

int main(int argc, char** argv) {
  ramkv::ClientOptions options;
  if (argc > 1) options.coordinator = argv[1];
  auto client = ramkv::Client::connect(options);
  if (!client.ok()) {
    std::fprintf(stderr, "connect: %s\n", ramkv::status_name(client.status()).data());
    return 1;
  }
  ramkv::Client& c = **client;
  auto table = c.create_table("greetings");
  if (!table.ok()) {
    std::fprintf(stderr, "create_table: %s\n", ramkv::status_name(table.status()).data());
    return 1;
  }
  auto version = c.write(*table, "hello", "world");
  if (!version.ok()) {
    std::fprintf(stderr, "write: %s\n", ramkv::status_name(version.status()).data());
    return 1;
  }
  auto read = c.read(*table, "hello");
  if (!read.ok()) {
    std::fprintf(stderr, "read: %s\n", ramkv::status_name(read.status()).data());
    return 1;
  }
  std::printf("hello -> %s (version %llu)\n", read->value.c_str(),
              static_cast<unsigned long long>(read->version));
  return 0;
}
