"""Generated gRPC contracts (make protos). Only this file is committed."""
