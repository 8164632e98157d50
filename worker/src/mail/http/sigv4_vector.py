import datetime
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
body = '{"Content":{"Raw":{"Data":"RnJvbTogYUBleGFtcGxlLmNvbQ0KDQpoaQ=="}},"Destination":{"ToAddresses":["b@example.com"]}}'
req = AWSRequest(method="POST", url="https://email.eu-west-1.amazonaws.com/v2/email/outbound-emails", data=body, headers={"content-type": "application/json"})
creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "session-token-example")
import botocore.auth
class Fixed(SigV4Auth):
    def _modify_request_before_signing(self, request):
        super()._modify_request_before_signing(request)
        if "X-Amz-Content-SHA256" in request.headers: del request.headers["X-Amz-Content-SHA256"]
a = Fixed(creds, "ses", "eu-west-1")
import unittest.mock as m
with m.patch("botocore.auth.get_current_datetime", return_value=datetime.datetime(2026, 12, 6, 4, 30, 0)):
    a.add_auth(req)
for k, v in req.headers.items(): print(k, ":", v)
